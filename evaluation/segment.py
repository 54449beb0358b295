"""Segment a user's own images with a user's own words (the library side of `ovseg segment`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ovseg.evaluation.datasets import voc_palette
from ovseg.evaluation.pictures import group_picture, load_rgb, overlay_with_legend, palette_png
from ovseg.evaluation.segmenter import PAPER_TEMPLATE, Protocol, ZeroShotSegmenter


def output_stems(images: list[Path]) -> list[str]:
    """A distinct output name per image: its stem, and `stem-2`, `stem-3`, ... when stems repeat
    (``a/x.png b/x.png`` must not write to the same files)."""
    seen: dict[str, int] = {}
    stems = []
    for path in images:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def check_images(images: list[Path]) -> None:
    """Raise ValueError naming the first file that is missing or not an image PIL can read."""
    for path in images:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"cannot read {path} as an image: {error}") from None


def segment_images(images: list[Path], checkpoint: Path, names: list[str], output: Path, *,
                   bg_threshold: float = 0.5, short_side: int | None = None,
                   save_groups: bool = False, device: str | None = None, scoring: str = "auto") -> Iterator[Path]:
    """For each image write `<stem>_overlay.png` (with a legend), `<stem>_labels.png` (palette
    PNG: 0 background, i = names[i-1]) and optionally `<stem>_groups.png`; yields the paths."""
    from ovseg.training.checkpoint import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint, map_location=device)
    side = short_side or int(getattr(model, "image_size", 224))
    window = max(side, 2 * int(getattr(model, "patch_size", 16)))
    segmenter = ZeroShotSegmenter(model, names, templates=(PAPER_TEMPLATE,), with_background=True,
                                  bg_threshold=bg_threshold, protocol=Protocol("segment", side, window, window // 2),
                                  device=device, scoring=scoring)
    output.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    legend = ["background", *names]
    ignore = None if len(legend) > 255 else 255  # past 255 classes, 255 is a class id
    for path, stem in zip(images, output_stems(images)):
        image = load_rgb(path)
        scores, groups = segmenter.scores(image, with_groups=save_groups)
        label = segmenter.predict_from_scores(scores)
        overlay = output / f"{stem}_overlay.png"
        overlay_with_legend(image, label, legend, palette, ignore=ignore).save(overlay)
        yield overlay
        labels = output / f"{stem}_labels.png"
        palette_png(label, palette, labels)
        yield labels
        if save_groups:
            group_path = output / f"{stem}_groups.png"
            Image.fromarray(group_picture(groups.numpy())).save(group_path)
            yield group_path
