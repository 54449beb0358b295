"""Pictures of segmentations: colour label maps, overlays with a legend, and side-by-side panels
(image, ground truth, prediction, groups)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ovseg.evaluation.metrics import IGNORE_INDEX

GROUP_COLOURS = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
], dtype=np.uint8)


def colourise(label: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) colours; the ignore label is white."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    table[IGNORE_INDEX] = 255
    return table[np.clip(label, 0, 255)]


def palette_png(label: np.ndarray, palette: list[list[int]], path: Path) -> None:
    """Save a label map as a palette PNG (indices stay readable by any segmentation tool)."""
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    image.putpalette(flat.reshape(-1).tolist())
    image.save(path)


def group_picture(groups: np.ndarray) -> np.ndarray:
    """(K, H, W) group scores -> (H, W, 3) colours of each pixel's arg-max group."""
    index = groups.argmax(axis=0)
    return GROUP_COLOURS[index % len(GROUP_COLOURS)]


def side_by_side(panels: list[np.ndarray], titles: list[str], scale: int = 1) -> Image.Image:
    """Panels of equal size in a row, each with a title above it."""
    h, w = panels[0].shape[:2]
    h, w = h * scale, w * scale
    title_h = 14
    canvas = Image.new("RGB", (len(panels) * (w + 4), h + title_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        image = Image.fromarray(panel).resize((w, h), Image.NEAREST)
        canvas.paste(image, (i * (w + 4), title_h))
        draw.text((i * (w + 4) + 2, 1), title, fill="black")
    return canvas


def overlay_with_legend(image: np.ndarray, label: np.ndarray, names: list[str],
                        palette: list[list[int]], alpha: float = 0.5) -> Image.Image:
    """The image with the colour label map blended on top and a legend of the classes present."""
    colours = colourise(label, palette).astype(np.float32)
    blended = (image.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(label) if c != IGNORE_INDEX and c < len(names)]
    row = 16
    h, w = blended.shape[:2]
    legend_w = max(120, 10 * max((len(names[c]) for c in present), default=4))
    canvas = Image.new("RGB", (w + legend_w, max(h, row * len(present) + 4)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        y = 2 + i * row
        draw.rectangle([w + 4, y, w + 16, y + 12], fill=tuple(int(v) for v in palette[c]))
        draw.text((w + 20, y), names[c], fill="black")
    return canvas
