"""`ovseg bench model`: what the model costs.

- a training step (forward + backward, all three losses) of each CPU preset: time and peak memory;
- the image encoder alone against a plain timm ViT of the same width, depth and input (the
  grouping overhead);
- forward FLOPs (torch.utils.flop_counter) and parameters of the `paper` preset.

Memory on a CPU is the peak resident set of a fresh process (each measurement runs in its own
spawned process), reported with its increase over the process after the model was built; on
CUDA it is `torch.cuda.max_memory_allocated`."""

from __future__ import annotations

import dataclasses
import statistics

import torch

from ovseg.benchmarks.measure import Measure, machine, median_seconds
from ovseg.benchmarks.results import Section
from ovseg.training.model.config import ModelConfig

CAPTIONS = ["a photo of a red circle and a blue square", "a green star on a striped background",
            "a dog and a person on the beach", "two yellow triangles next to a circle"]


def _config(preset: str, **changes) -> ModelConfig:
    from ovseg.training.presets import get_preset

    return dataclasses.replace(ModelConfig(**get_preset(preset)["model"]), **changes)


def random_batch(cfg: ModelConfig, tokenizer, b: int, device: str) -> dict:
    """A training batch of `b` random images (and partners) with captions, questions, answers and
    shared-entity prompts drawn from CAPTIONS, for every loss."""
    g = torch.Generator().manual_seed(0)
    size = cfg.image_size

    def text(texts):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.max_text_length,
                        return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    ids, mask = text(captions)
    q_ids, q_mask = text([c.replace("circle", "[MASK]").replace("star", "[MASK]") for c in captions])
    a_ids, a_mask = text(["a photo of a circle"] * b)
    return {
        "image": torch.randn(b, 3, size, size, generator=g).to(device),
        "partner_image": torch.randn(b, 3, size, size, generator=g).to(device),
        "input_ids": ids, "attention_mask": mask, "question_ids": q_ids, "question_mask": q_mask,
        "answer_ids": a_ids, "answer_mask": a_mask, "shared_ids": a_ids, "shared_mask": a_mask,
        "has_entity": torch.ones(b, dtype=torch.bool, device=device),
        "has_partner": torch.ones(b, dtype=torch.bool, device=device),
    }


def _tokenizer(cfg: ModelConfig):
    from ovseg.training.tokenizer import train_wordpiece

    return train_wordpiece(CAPTIONS * 4, vocab_size=1000, min_frequency=1)


def _autocast(device: str):
    """bf16 autocast on CUDA, as training runs there; nothing on a CPU."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def time_train_step(model, batch: dict, device: str, repeats: int, warmup: int = 1, optimizer=None) -> dict:
    """The one timing of a training step that `ovseg bench model` and `ovseg bench train` share:
    forward with every loss the model has, backward (bf16 autocast on CUDA) and, with an
    `optimizer`, its step and the momentum encoder's update. Median seconds over `repeats`
    steps after `warmup` untimed ones; the peak memory (`Measure`'s) over all of them and the
    reading before the first (`start_mib`)."""

    def step():
        with _autocast(device):
            loss = model(batch)["loss"]
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            model.momentum_update()
        model.zero_grad(set_to_none=True)

    with Measure(device) as whole:
        seconds = median_seconds(step, repeats, device, warmup=warmup)
    return {"seconds": seconds, "peak_mib": whole.peak_mib, "start_mib": whole.start_mib}


def measure_train_step(preset: str, batch_size: int, repeats: int, device: str, threads: int) -> dict:
    """One preset's training step with all three losses (run in a fresh process for memory)."""
    from ovseg.training.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _config(preset, losses=["contrastive", "entity", "mask"], vision_init=None)
    model = build_model(cfg, tokenizer=_tokenizer(cfg)).to(device).train()
    timed = time_train_step(model, random_batch(cfg, model.tokenizer, batch_size, device), device, repeats)
    return {"preset": preset, "batch": batch_size, "seconds": timed["seconds"],
            "images_per_s": batch_size / timed["seconds"], "peak_mib": timed["peak_mib"],
            "step_mib": timed["peak_mib"] - timed["start_mib"]}


def _has_vit_twin(preset: str) -> bool:
    cfg = _config(preset, vision_init=None)
    return cfg.patch_embed == "linear" and cfg.depth_before + cfg.depth_after > 0


def measure_encoder_vs_vit(preset: str, batch_size: int, repeats: int, device: str, threads: int) -> dict:
    """Forward + backward of the grouping image encoder and of a plain timm ViT of the same
    width, depth, heads, patch and input size."""
    import timm

    from ovseg.training.model.image_encoder import GroupingViT

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = _config(preset, vision_init=None)
    ours = GroupingViT(cfg).to(device).train()
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=cfg.image_size,
                            patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth_before + cfg.depth_after,
                            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio).to(device).train()
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        with _autocast(device):
            out = ours(images).groups.float().mean()
        out.backward()

    def vit_step():
        vit.zero_grad(set_to_none=True)
        with _autocast(device):
            out = vit(images).float().mean()
        out.backward()

    # alternate the two so that a busy machine slows both alike
    ours_times, vit_times = [], []
    for _ in range(repeats):
        ours_times.append(median_seconds(ours_step, 1, device))
        vit_times.append(median_seconds(vit_step, 1, device))
    t_ours, t_vit = statistics.median(ours_times), statistics.median(vit_times)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"preset": preset, "batch": batch_size, "grouping_vit_s": t_ours, "timm_vit_s": t_vit,
            "overhead": t_ours / t_vit - 1, "grouping_vit_params": count(ours), "timm_vit_params": count(vit),
            "tokens": f"{(cfg.image_size // cfg.patch_size) ** 2} patches + {cfg.num_group_tokens} group tokens "
                      f"x {cfg.depth_before}, then {cfg.num_groups} groups x {cfg.depth_after}"}


def paper_flops_and_parameters(batch_size: int = 2, threads: int = 2) -> dict:
    """Forward FLOPs of the `paper` preset (random weights: no hub here) and its parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    from ovseg.training.model import build_model, parameter_counts

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # bert-base-uncased's architecture and vocabulary size, random weights (no hub here)
    cfg = _config("paper", text_pretrained=None, vision_init=None, text_vocab_size=30522,
                  losses=["contrastive", "entity", "mask"])
    tokenizer = _tokenizer(cfg)
    model = build_model(cfg, tokenizer=tokenizer).train()
    batch = random_batch(cfg, tokenizer, batch_size, "cpu")

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    image = flops(lambda: model.encode_image(batch["image"][:1]))
    text = flops(lambda: model.embed_text(batch["input_ids"][:1], batch["attention_mask"][:1]))
    train = flops(lambda: model(batch)) / batch_size
    return {"image_gflops": image / 1e9, "text_gflops": text / 1e9, "train_forward_gflops_per_sample": train / 1e9,
            "text_length": cfg.max_text_length, "parameters": parameter_counts(model)}


def _in_fresh_process(fn, *args):
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def benchmark_model(presets: tuple[str, ...] = ("test", "synthetic-small"), batch_size: int = 16,
                    repeats: int = 5, paper_batch: int = 2, paper_repeats: int = 3, device: str = "cpu",
                    threads: int | None = None, command: str = "ovseg bench model") -> tuple[Section, dict]:
    """Run every measurement (each in its own process) and return (the results section: `model`,
    or `model-cuda` on a GPU, and the numbers)."""
    import os

    threads = threads or min(4, os.cpu_count() or 1)
    load = os.getloadavg()[0]  # other work on the machine slows every number below
    steps = [_in_fresh_process(measure_train_step, p, batch_size, repeats, device, threads) for p in presets]
    # the comparison is a ViT with and without the grouping: presets without transformer
    # blocks or with a non-ViT patch embedding have no plain ViT of the same shape
    comparable = [p for p in presets if p != "test" and _has_vit_twin(p)]
    skipped = [p for p in presets if p != "test" and p not in comparable]
    encoders = [_in_fresh_process(measure_encoder_vs_vit, p, batch_size, repeats, device, threads)
                for p in comparable]
    encoders.append(_in_fresh_process(measure_encoder_vs_vit, "paper", paper_batch, paper_repeats, device, threads))
    paper = _in_fresh_process(paper_flops_and_parameters, paper_batch, threads)

    memory = "peak CUDA memory allocated" if device.startswith("cuda") else "peak resident memory of the process"
    precision = "bf16 autocast" if device.startswith("cuda") else "float32"
    kind = device.split(":")[0]
    name, title = ("model", "") if kind == "cpu" else (f"model-{kind}", f", {kind.upper()}")
    section = Section(name, f"Model cost{title} (`ovseg bench model --device {device}`)", command,
                      machine={**machine(device), "torch_threads": threads})
    section.text(f"Device `{device}` ({precision}), {threads} torch threads; load average {load:.1f} when the "
                 "benchmark started.")
    section.text(f"**Training step** (forward + backward, contrastive + entity + mask losses; median of {repeats}):")
    section.table(["preset", ("batch", "right", "d"), ("step (s)", "right", ".3f"), ("images/s", "right", ".1f"),
                   ("peak memory (MiB)", "right", ".0f"), ("increase during the steps (MiB)", "right", ".0f")],
                  [[s["preset"], s["batch"], s["seconds"], s["images_per_s"], s["peak_mib"], s["step_mib"]]
                   for s in steps])
    section.text(f"Memory is the {memory}.")
    section.text("**Image encoder vs a plain timm ViT** of the same width, depth, heads and input "
                 "(forward + backward; target: grouping overhead under 25%):")
    section.table(["preset", ("batch", "right", "d"), "tokens per block", ("grouping ViT (s)", "right", ".3f"),
                   ("timm ViT (s)", "right", ".3f"), ("overhead", "right"), "params (grouping / timm)"],
                  [[e["preset"], e["batch"], e["tokens"], e["grouping_vit_s"], e["timm_vit_s"],
                    f"{100 * e['overhead']:+.1f}%",
                    f"{e['grouping_vit_params'] / 1e6:.2f}M / {e['timm_vit_params'] / 1e6:.2f}M"] for e in encoders])
    if skipped:
        section.text("Not compared (a CNN patch embedding or no transformer block, so no plain ViT of the "
                     "same shape): " + ", ".join(f"`{p}`" for p in skipped) + ".")
    section.text("**`paper` preset** (ViT-B/16, 64 -> 8 groups, BERT-base architecture with random weights): "
                 f"forward FLOPs {paper['image_gflops']:.1f} GFLOPs per 224 px image (image encoder + projector), "
                 f"{paper['text_gflops']:.1f} GFLOPs per caption of {paper['text_length']} tokens (text encoder + "
                 f"projector), {paper['train_forward_gflops_per_sample']:.1f} GFLOPs per sample for the training "
                 "forward with all three losses (image, partner image, momentum encoder, caption, question, "
                 "answer and shared-entity prompts).")
    section.table(["part", ("parameters", "right", ",d"), ("millions", "right", ".2f")],
                  [[part, n, n / 1e6] for part, n in paper["parameters"].items()])
    return section, {"steps": steps, "encoders": encoders, "paper": paper}
