"""Training benchmarks (`ovseg bench train`): loader throughput per process with the paper's
augmentations on 256 px JPEGs, and training steps/s (and peak memory) of a preset on a device."""

from __future__ import annotations

import io
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovseg.curation.contract import write_contract


def _write_jpeg_contract(root: Path, n: int, size: int) -> None:
    """A DATA folder in the on-disk contract with n smooth random JPEGs of size x size."""
    rng = np.random.default_rng(0)
    images = {}
    for i in range(n):
        small = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        images[i] = buf.getvalue()
    chunks = [{"start": 11, "end": 16, "entity": "dog"}, {"start": 21, "end": 29, "entity": "person"}]
    samples = [{"sample_id": i, "url": "", "caption": "a photo of a dog and a person on a beach",
                "entities": ["dog", "person"], "chunks": chunks} for i in range(n)]
    pairs = [{"sample_id": i, "partner_id": (i + 1) % n, "entity": "dog"} for i in range(n)]
    write_contract(root, samples, images, per_shard=n, pairs=pairs)


def loader_throughput(n: int = 400, image_size: int = 224, source_size: int = 256, repeats: int = 5) -> dict[str, float]:
    """Samples/s of one process (one core) reading, decoding, augmenting and tokenising:
    stage 1 with the paper's DeiT-style augmentations, stage 2 with pairs (two images).
    Per core is samples over the process's CPU seconds (one thread), so other processes do not
    lower it; the wall-clock rate is reported beside it. Each rate is the median of `repeats`
    passes, with the lowest and highest (`*_min`, `*_max`): on a shared virtual machine single
    passes differ too much to compare one with another."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _loader_passes(n, image_size, source_size, repeats)
    finally:  # the training steps timed after this run with the caller's threads, not one
        torch.set_num_threads(threads)


def _loader_passes(n: int, image_size: int, source_size: int, repeats: int) -> dict[str, float]:
    from ovseg.training.config import DataConfig, RunConfig
    from ovseg.training.data import CaptionImageDataset, collate, load_samples
    from ovseg.training.tokenizer import train_wordpiece

    tokenizer = train_wordpiece(["a photo of a dog and a person on a beach"] * 4, vocab_size=200)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "DATA"
        _write_jpeg_contract(root, n, source_size)
        for stage in (1, 2):
            table = load_samples(str(root), with_pairs=stage == 2)
            spec = RunConfig().train.stages[stage - 1]  # the default stages: DeiT-style, then crop and flip with partners
            dataset = CaptionImageDataset(table, tokenizer, image_size, spec, DataConfig(), seed=0)
            cpu, wall = [], []
            for _ in range(repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                batch = []
                for i in range(len(dataset)):
                    batch.append(dataset[i])
                    if len(batch) == 32:
                        collate(batch)
                        batch = []
                cpu.append(len(dataset) / (time.process_time() - cpu_start))
                wall.append(len(dataset) / (time.perf_counter() - start))
            out[f"stage{stage}"] = statistics.median(cpu)
            out[f"stage{stage}_min"], out[f"stage{stage}_max"] = min(cpu), max(cpu)
            out[f"stage{stage}_wall"] = statistics.median(wall)
    return out


def train_throughput(preset: str, device: str = "cpu", batch_size: int | None = None, steps: int = 10,
                     warmup: int = 3, losses: tuple[str, ...] = ("contrastive", "entity", "mask"),
                     overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """Optimizer steps/s and images/s of a preset on random tensors (no data loading), with
    bf16 autocast on CUDA; peak memory of the device (CUDA) or of the process (CPU)."""
    from contextlib import nullcontext
    from dataclasses import replace

    from ovseg.training.config import resolve
    from ovseg.training.model import build_model
    from ovseg.training.tokenizer import train_wordpiece

    cfg = resolve(preset, overrides=list(overrides))
    if cfg.model.text_pretrained or cfg.model.vision_init:
        # speed does not depend on the weights: the same architecture, randomly initialised, so
        # the benchmark runs offline (bert-base-uncased's default shape and vocabulary size)
        cfg = resolve(preset, overrides=[*overrides, "model.text_pretrained=null", "model.vision_init=null",
                                         "model.text_vocab_size=30522"])
    cfg = replace(cfg, model=replace(cfg.model, losses=list(losses)))
    b = batch_size or cfg.train.batch_size
    tokenizer = train_wordpiece(["a photo of a dog and a person on a beach"] * 4, vocab_size=cfg.data.tokenizer_vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size, length = cfg.model.image_size, cfg.model.max_text_length
    ids = torch.randint(5, len(tokenizer), (b, length), device=device)
    mask = torch.ones(b, length, dtype=torch.long, device=device)
    batch = {"image": torch.randn(b, 3, size, size, device=device), "input_ids": ids, "attention_mask": mask,
             "question_ids": ids, "question_mask": mask, "answer_ids": ids, "answer_mask": mask,
             "has_entity": torch.ones(b, dtype=torch.bool, device=device),
             "partner_image": torch.randn(b, 3, size, size, device=device), "shared_ids": ids, "shared_mask": mask,
             "has_partner": torch.ones(b, dtype=torch.bool, device=device)}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.startswith("cuda") else nullcontext
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.momentum_update()

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    seconds = (time.perf_counter() - start) / steps
    return {"steps_per_s": 1 / seconds, "images_per_s": b / seconds, "batch_size": b, "peak_gib": peak,
            "threads": torch.get_num_threads()}


def report(loader: dict | None, runs: list[tuple[str, str, dict]]) -> str:
    lines = []
    if loader:
        spread = lambda k: f"{loader[f'{k}_min']:.0f} to {loader[f'{k}_max']:.0f}"  # noqa: E731
        lines += ["Loader, one process (one core), 256 px JPEGs to 224 px, with tokenising and entity masking; "
                  "median of the passes, their range beside it:", "",
                  "| stage | per CPU-second of one core | range | wall clock | target |", "|---|---:|---:|---:|---:|",
                  f"| 1 (DeiT-style: crop, flip, RandAugment, erasing; timm turns jitter off under RandAugment) | {loader['stage1']:.0f} samples/s | "
                  f"{spread('stage1')} | {loader['stage1_wall']:.0f} samples/s | 300 |",
                  f"| 2 (crop, flip; an image and its partner) | {loader['stage2']:.0f} pairs/s | "
                  f"{spread('stage2')} | {loader['stage2_wall']:.0f} pairs/s | 150 |", ""]
    if runs:
        lines += ["Training steps on random tensors (all three losses on; bf16 autocast on CUDA):", "",
                  "| preset | device | torch threads | batch | steps/s | images/s | peak memory (GiB) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p} | {d} | {r['threads']} | {r['batch_size']} | {r['steps_per_s']:.2f} | {r['images_per_s']:.1f} "
                  f"| {r['peak_gib']:.2f} |"
                  for p, d, r in runs]
    return "\n".join(lines) + "\n"
