"""Training benchmarks (`ovseg bench train`): loader throughput per process with the paper's
augmentations on 256 px JPEGs, and training steps/s (and peak memory) of a preset on a device."""

from __future__ import annotations

import io
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovseg.benchmarks.measure import Measure, machine, median_seconds
from ovseg.benchmarks.results import Blocks, Section
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
                with Measure() as m:
                    batch = []
                    for i in range(len(dataset)):
                        batch.append(dataset[i])
                        if len(batch) == 32:
                            collate(batch)
                            batch = []
                cpu.append(len(dataset) / m.cpu_seconds)
                wall.append(len(dataset) / m.seconds)
            out[f"stage{stage}"] = statistics.median(cpu)
            out[f"stage{stage}_min"], out[f"stage{stage}_max"] = min(cpu), max(cpu)
            out[f"stage{stage}_wall"] = statistics.median(wall)
    return out


def train_throughput(preset: str, device: str = "cpu", batch_size: int | None = None, steps: int = 10,
                     warmup: int = 3, losses: tuple[str, ...] = ("contrastive", "entity", "mask"),
                     overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """Optimizer steps/s and images/s of a preset on random tensors (no data loading), with
    bf16 autocast on CUDA; peak memory of the device (CUDA) or of the process (CPU). The step is
    `ovseg bench model`'s (`time_train_step`), here with AdamW's step and the momentum update."""
    from dataclasses import replace

    from ovseg.benchmarks.model import random_batch, time_train_step
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
    timed = time_train_step(model, random_batch(cfg.model, tokenizer, b, device), device, steps, warmup, optimizer)
    seconds = timed["seconds"]
    return {"steps_per_s": 1 / seconds, "images_per_s": b / seconds, "batch_size": b,
            "peak_gib": timed["peak_mib"] / 1024, "threads": torch.get_num_threads()}


ACCUMULATION_LOSSES = ("contrastive", "entity", "mask")


def accumulation_costs(preset: str, device: str, batch: int, ks: tuple[int, ...] = (2, 4, 8), repeats: int = 5,
                       threads: int = 2) -> list[dict]:
    """One optimiser step's forward and backward over a global batch of `batch` random samples
    (the three paper losses, per-sample noise on): as one batch, and as k micro-batches for each
    k of `ks`, plain (gradients averaged) and cached (gradient caching). The modes take turns
    within each of `repeats` rounds (after a warm-up round), so a machine that slows down or
    speeds up during the run moves every mode alike; the median step time and the median rise
    of the memory in use during a step (`PeakGrowth`) of each. Runs in a spawned process. On a
    CPU, whose allocator keeps what a step freed for the next, each mode's memory is its first
    step's in a process of its own (`first_step_memory`)."""
    from ovseg.benchmarks.model import _in_fresh_process

    runs = _in_fresh_process(_accumulation_costs, preset, device, batch, tuple(ks), repeats, threads)
    if not device.startswith("cuda"):
        for run in runs:
            run["step_mib"] = _in_fresh_process(_accumulation_costs, preset, device, batch, (run["k"],), 0, threads,
                                                run["mode"])[0]["step_mib"]
    return runs


def _accumulation_costs(preset: str, device: str, batch: int, ks: tuple[int, ...], repeats: int,
                        threads: int, only: str | None = None) -> list[dict]:
    """`accumulation_costs` in this process; `only` keeps one mode (with `repeats` 0: its first
    step only, timed and measured)."""
    from ovseg.benchmarks.measure import PeakGrowth
    from ovseg.benchmarks.model import _autocast, _config, _tokenizer, random_batch
    from ovseg.training import gradcache
    from ovseg.training.model import build_model, noise

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _config(preset, losses=list(ACCUMULATION_LOSSES), vision_init=None, text_pretrained=None)
    model = build_model(cfg, tokenizer=_tokenizer(cfg)).to(device).train()
    whole = random_batch(cfg, model.tokenizer, batch, device)
    whole["sample_id"] = torch.arange(batch, device=device)
    modes = [("full", 1, [whole])] + [(mode, k, gradcache.split_batch(whole, k)) for k in ks
                                      for mode in ("plain", "cached")]
    if only is not None:
        modes = [m for m in modes if m[0] == only][:1]

    def step(mode: str, micro: list[dict]) -> None:
        with _autocast(device):
            if mode == "cached":
                gradcache.cached_step(model, micro, step_seed=0)
            else:
                for part in micro:
                    with noise.per_sample(noise.batch_seeds(part, 0), 0):
                        (model(part)["loss"] / len(micro)).backward()
        model.zero_grad(set_to_none=True)

    seconds = {i: [] for i in range(len(modes))}
    growth = {i: [] for i in range(len(modes))}
    for round_ in range(repeats + 1):
        for i, (mode, _, micro) in enumerate(modes):
            with Measure(device, reset_peak=False) as timed, PeakGrowth(device) as grew:
                step(mode, micro)
            if round_ or not repeats:  # the first round warms up, unless it is the only one
                seconds[i].append(timed.seconds)
                growth[i].append(grew.mib)
    return [{"preset": preset, "mode": mode, "k": k, "micro_batch": batch // k, "batch": batch,
             "seconds": statistics.median(seconds[i]), "samples_per_s": batch / statistics.median(seconds[i]),
             "step_mib": statistics.median(growth[i])} for i, (mode, k, _) in enumerate(modes)]


def report_accumulation(section: Blocks, runs: list[dict], device: str) -> Blocks:
    """The table of what k micro-batches cost against one batch."""
    first = runs[0]
    section.text(f"A global batch of {first['batch']} in k micro-batches (`{first['preset']}` preset, "
                 f"{', '.join(ACCUMULATION_LOSSES)} losses, random tensors, forward and backward only; "
                 f"{'bf16 autocast; allocated' if device.startswith('cuda') else 'float32; resident'} memory; "
                 "the modes take turns in each round, medians of the rounds): plain accumulation is k batches of the micro-batch, each contrastive loss "
                 "seeing only its own negatives; caching (`optim.contrastive_cache`) is the exact gradient of the "
                 "whole batch, at about one extra forward pass.")
    full = first["seconds"]
    section.table(["accumulation", ("k", "right", "d"), ("micro-batch", "right", "d"), ("samples/s", "right", ".1f"),
                   ("step time vs one batch", "right", ".2f"), ("memory a step adds (MiB)", "right", ".0f"),
                   ("vs one batch", "right", ".2f")],
                  [[{"full": "one batch", "plain": "plain", "cached": "cached"}[r["mode"]], r["k"], r["micro_batch"],
                    r["samples_per_s"], r["seconds"] / full, r["step_mib"],
                    r["step_mib"] / first["step_mib"] if first["step_mib"] else None] for r in runs])
    return section


def benchmark_train(presets: tuple[str, ...] = ("test", "synthetic-small"), device: str = "cpu",
                    batch_size: int | None = None, steps: int = 10, loader: bool = True,
                    overrides: tuple[str, ...] = (), command: str = "ovseg bench train",
                    accumulation: tuple[int, ...] = (2, 4, 8), accumulation_preset: str | None = None,
                    accumulation_batch: int | None = None, threads: int = 2) -> tuple[Section, dict]:
    """Loader throughput (with `loader`), each preset's training throughput on `device`, and
    what gradient accumulation costs (plain and cached, at each k of `accumulation`; none when
    empty): the results section (`train`, or `train-cuda` on a GPU) and the numbers. The
    accumulation rows use `accumulation_preset` (default `synthetic-paper` on a CPU, `paper` on
    CUDA) at `accumulation_batch` (default 64 on a CPU, 256 on CUDA)."""
    load = loader_throughput() if loader else None
    runs = [(p, device, train_throughput(p, device, batch_size, steps, overrides=overrides)) for p in presets]
    cuda = device.startswith("cuda")
    accum = []
    if accumulation:
        accum = accumulation_costs(accumulation_preset or ("paper" if cuda else "synthetic-paper"), device,
                                   accumulation_batch or (256 if cuda else 64), accumulation, threads=threads)
    section = Section("train-cuda" if cuda else "train",
                      f"Training throughput (`ovseg bench train --device {device}`)", command, machine=machine(device))
    report(section, load, runs)
    if accum:
        report_accumulation(section, accum, device)
    return section, {"loader": load, "runs": runs, "accumulation": accum}


def report(section: Blocks, loader: dict | None, runs: list[tuple[str, str, dict]]) -> Blocks:
    """Add the loader's and the training steps' tables to `section`."""
    if loader:
        spread = lambda k: f"{loader[f'{k}_min']:.0f} to {loader[f'{k}_max']:.0f}"  # noqa: E731
        section.text("Loader, one process (one core), 256 px JPEGs to 224 px, with tokenising and entity masking; "
                     "median of the passes, their range beside it:")
        section.table(["stage", ("per CPU-second of one core", "right"), ("range", "right"), ("wall clock", "right"),
                       ("target", "right", "d")], [
            ["1 (DeiT-style: crop, flip, RandAugment, erasing; timm turns jitter off under RandAugment)",
             f"{loader['stage1']:.0f} samples/s", spread("stage1"), f"{loader['stage1_wall']:.0f} samples/s", 300],
            ["2 (crop, flip; an image and its partner)", f"{loader['stage2']:.0f} pairs/s", spread("stage2"),
             f"{loader['stage2_wall']:.0f} pairs/s", 150]])
    if runs:
        section.text("Training steps on random tensors (all three losses on; bf16 autocast on CUDA):")
        section.table(["preset", "device", ("torch threads", "right", "d"), ("batch", "right", "d"),
                       ("steps/s", "right", ".2f"), ("images/s", "right", ".1f"), ("peak memory (GiB)", "right", ".2f")],
                      [[p, d, r["threads"], r["batch_size"], r["steps_per_s"], r["images_per_s"], r["peak_gib"]]
                       for p, d, r in runs])
    return section
