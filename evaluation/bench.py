"""Evaluation speed (`ovseg bench eval`): images/s of the zero-shot segmenter for a preset's
model at a protocol, on images of a typical benchmark size."""

from __future__ import annotations

import time

import numpy as np
import torch

from ovseg.evaluation.segmenter import PROTOCOLS, ZeroShotSegmenter


def eval_throughput(preset: str, protocol: str = "paper", n_images: int = 4, size: tuple[int, int] = (375, 500),
                    n_classes: int = 20, device: str = "cpu") -> dict[str, float]:
    """Images/s (sliding windows included) of a randomly initialised model of `preset`."""
    from ovseg.training.config import resolve
    from ovseg.training.model import build_model
    from ovseg.training.tokenizer import train_wordpiece

    cfg = resolve(preset, overrides=["model.losses=[contrastive]"])
    names = [f"class{i}" for i in range(n_classes)]
    tokenizer = train_wordpiece([f"a photo of a {n}." for n in names], vocab_size=cfg.data.tokenizer_vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer).to(device).eval()
    segmenter = ZeroShotSegmenter(model, names, protocol=PROTOCOLS[protocol], device=device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n_images + 1)]
    segmenter.predict(images[0])  # warm-up and class embeddings
    start = time.perf_counter()
    for image in images[1:]:
        segmenter.predict(image)
    seconds = time.perf_counter() - start
    return {"images_per_s": n_images / seconds, "windows": len(segmenter._windows(
        *segmenter._prepare(images[0]).shape[-2:])), "threads": torch.get_num_threads()}


def report(rows: list[tuple[str, str, str, dict]]) -> str:
    lines = ["| preset | protocol | device | windows per image | images/s |", "|---|---|---|---:|---:|"]
    lines += [f"| {p} | {proto} | {d} | {r['windows']} | {r['images_per_s']:.2f} |" for p, proto, d, r in rows]
    return "\n".join(lines) + "\n"
