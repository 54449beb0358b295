"""The training loop: one code path for one CPU process and for N GPUs on M nodes (torchrun).

Read top to bottom: set-up (processes, tokenizer, model, optimiser, schedule, resume), then the
loop in sections (data, forward, backward and step, logging, checkpoints and stopping).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ovseg.training import checkpoint as ckpt
from ovseg.training import distributed as dist_utils
from ovseg.training.config import RunConfig, to_dict, write_config
from ovseg.training.data import (
    CaptionImageDataset, ResumableSampler, captions_for_tokenizer, load_samples, make_loader, normalize_images,
)

log = logging.getLogger(__name__)

EvalFn = Callable[[torch.nn.Module, int], dict[str, float]]


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, too many unreadable images)."""


# -- set-up helpers ----------------------------------------------------------------------------

def _tokenizer(cfg: RunConfig, run_dir: Path, info, state: dict | None):
    """The run's tokenizer: from the checkpoint, a directory, or trained on the captions."""
    from ovseg.training.tokenizer import load_tokenizer, tokenizer_from_json, train_wordpiece

    if state is not None and state.get("tokenizer"):
        return ckpt.tokenizer_from_state(state)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    if getattr(cfg.model, "text_pretrained", None):  # the text encoder's own tokenizer
        from ovseg.training.model.text_encoder import load_text_tokenizer

        return load_text_tokenizer(cfg.model)
    saved = run_dir / "tokenizer.json"
    if info.is_main and not saved.exists():
        tokenizer = train_wordpiece(captions_for_tokenizer(cfg.data.data_dir), vocab_size=cfg.data.tokenizer_vocab_size)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(tokenizer.backend_tokenizer.to_str())
        tmp.replace(saved)
    dist_utils.barrier()
    return tokenizer_from_json(saved.read_text())


DECAY_RULES = ("official", "ovseg")
SCHEDULES = ("official", "ovseg")


def _param_groups(model: torch.nn.Module, weight_decay: float, rule: str = "ovseg") -> list[dict[str, Any]]:
    """Two groups, with and without weight decay, of the trainable parameters. "official" (the
    public code's `set_weight_decay`): no decay for 1-d parameters and biases; 0-d parameters
    such as the logit scale, tokens and position embeddings are decayed. "ovseg": no decay for
    biases, norms and any parameter of at most one dimension, tokens, position embeddings and
    the logit scale."""
    if rule not in DECAY_RULES:
        raise ValueError(f"unknown optim.no_decay {rule!r}; choose from {', '.join(DECAY_RULES)}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if rule == "official":
            skip = p.ndim == 1 or name.endswith(".bias")
        else:
            skip = p.ndim <= 1 or "token" in name or "pos_embed" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def official_lr(t: int, total: int, warmup: int, base: float, warmup_lr: float, min_lr: float) -> float:
    """The learning rate of timm's CosineLRScheduler as the public code builds it (cosine over
    all `total` steps, the warm-up included, one cycle; a linear warm-up from `warmup_lr` over the
    first `warmup` steps) at update count t."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if t >= total:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


def _schedule(optimizer, total_steps: int, warmup: int, base: float, min_lr: float, warmup_lr: float = 0.0,
              form: str = "ovseg"):
    """A LambdaLR over the optimiser's `base` learning rate. "ovseg": linear warm-up to `base`
    (step s at (s + 1) / warmup of it), then cosine decay to `min_lr` over the remaining steps.
    "official": `official_lr`, stepped as the public loop steps it (the scheduler is updated
    with the index of the step just taken, so the first two steps both run at the first value)."""
    if form not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {form!r}; choose from {', '.join(SCHEDULES)}")
    min_ratio = min_lr / base if base else 0.0

    def ovseg(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def official(step: int) -> float:
        lr = official_lr(max(step - 1, 0), total_steps, warmup, base, warmup_lr, min_lr)
        return lr / base if base else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, official if form == "official" else ovseg)


def stage_rates(cfg: RunConfig, stage: int, global_batch: int) -> dict[str, float]:
    """Stage `stage`'s peak, warm-up start and final learning rates. Stage 2 takes its own
    (`optim.stage2_*`) where set, else stage 1's peak times `train.stage2_lr_factor` and stage
    1's warm-up and final rates. With `optim.scale_lr` each is scaled by global batch / 4096."""
    o = cfg.optim
    base, warmup_lr, min_lr = o.lr, o.warmup_lr, o.min_lr
    if stage == 2:
        base = o.stage2_lr if o.stage2_lr is not None else o.lr * cfg.train.stage2_lr_factor
        warmup_lr = o.stage2_warmup_lr if o.stage2_warmup_lr is not None else warmup_lr
        min_lr = o.stage2_min_lr if o.stage2_min_lr is not None else min_lr
    scale = global_batch / 4096 if o.scale_lr else 1.0
    return {"lr": base * scale, "warmup_lr": warmup_lr * scale, "min_lr": min_lr * scale}


def stage_lengths(cfg: RunConfig, stage: int, steps_per_epoch: int) -> tuple[int, int]:
    """Stage `stage`'s optimiser steps and warm-up steps: from epochs of the run's data where
    the config gives them (`train.epochs`, `optim.warmup_epochs`, and their `stage2_` forms),
    else from the step counts."""
    t, o = cfg.train, cfg.optim
    if stage == 1:
        epochs, steps, warm_epochs, warm_steps = t.epochs, t.steps, o.warmup_epochs, o.warmup_steps
    else:
        epochs, steps = t.stage2_epochs, t.stage2_steps
        warm_epochs = o.stage2_warmup_epochs if o.stage2_warmup_epochs is not None else (
            o.warmup_epochs if o.stage2_warmup_steps is None else None)
        warm_steps = o.stage2_warmup_steps if o.stage2_warmup_steps is not None else o.warmup_steps
    total = int(epochs * steps_per_epoch) if epochs is not None else steps
    warmup = int(warm_epochs * steps_per_epoch) if warm_epochs is not None else warm_steps
    return total, warmup


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in keep))


def _tensorboard(run_dir: Path):
    """A SummaryWriter into RUN/tb, or None (with a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard=true but tensorboard is not installed (pip install tensorboard): "
                    "metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _moving_average(model: torch.nn.Module, decay: float):
    """timm's ModelEmaV3 of `model` (warm-up: the decay grows from 0 towards `decay`, so the
    average starts as the model itself), or None when `decay` is 0."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and returns cleanly."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# -- the loop ----------------------------------------------------------------------------------

# Unreadable samples that are evidence enough, before `data.min_samples_for_skip_check`
# samples were seen, that the share of unreadable ones is above `data.max_skip_rate`.
SKIP_EVIDENCE = 20


def _too_many_skipped(seen: int, skipped: int, data_cfg) -> bool:
    """More than `max_skip_rate` of the samples seen were unreadable, on enough samples to say so."""
    if seen == 0 or skipped / seen <= data_cfg.max_skip_rate:
        return False
    return seen >= data_cfg.min_samples_for_skip_check or skipped >= SKIP_EVIDENCE


def _check_settings(cfg: RunConfig) -> None:
    """One-line errors for settings no run can use (before anything is written)."""
    import math

    t, o = cfg.train, cfg.optim
    steps = t.steps if t.stage == 1 else t.stage2_steps
    name = "train.steps" if t.stage == 1 else "train.stage2_steps"
    problems = []
    if steps < 1:
        problems.append(f"{name} must be at least 1, not {steps}")
    if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
        problems.append(f"optim.lr must be a finite number above 0, not {o.lr}")
    if not (isinstance(o.min_lr, (int, float)) and math.isfinite(o.min_lr) and o.min_lr >= 0):
        problems.append(f"optim.min_lr must be a finite number of 0 or more, not {o.min_lr}")
    if t.batch_size < 1:
        problems.append(f"train.batch_size must be at least 1, not {t.batch_size}")
    if t.max_minutes is not None and not (math.isfinite(t.max_minutes) and t.max_minutes > 0):
        problems.append(f"train.max_minutes must be above 0, not {t.max_minutes}")
    if problems:
        raise TrainingError("; ".join(problems))


def _progress_bar(max_minutes, total_steps: int, step: int, stage: int, enabled: bool):
    """Steps done of `total_steps`; a run bounded by time shows its time budget instead."""
    if max_minutes is None:
        return tqdm(total=total_steps, initial=step, desc=f"stage {stage}", unit="step", disable=not enabled,
                    dynamic_ncols=True)
    return tqdm(total=round(max_minutes * 60), desc=f"stage {stage} ({max_minutes:g} min budget)", unit="s",
                disable=not enabled, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")


def _advance(bar, step: int, total_steps: int, started: float, max_minutes) -> None:
    if max_minutes is None:
        bar.update(1)
        return
    bar.update(min(time.perf_counter() - started, bar.total) - bar.n)
    bar.set_postfix_str(f"step {step}/{total_steps}", refresh=False)


def train(cfg: RunConfig, run_dir: Path, init: Path | None = None, eval_fn: EvalFn | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train one stage (`cfg.train.stage`) into `run_dir`; resume if it holds a checkpoint.
    Stage 2 starts from `init` (stage 1's checkpoint) unless it resumes. Returns a summary."""
    from ovseg.training.model import build_model

    run_dir = Path(run_dir)
    info = dist_utils.setup(cfg.train.device)
    t = cfg.train
    stage = t.stage
    if stage not in (1, 2):
        raise ValueError(f"train.stage must be 1 or 2, not {stage}")
    _check_settings(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(t.seed + info.rank)

        # ---- resume or start ----
        resume_path = ckpt.latest(run_dir)
        state = ckpt.load(resume_path) if resume_path else None
        init_state = ckpt.load(init) if (init is not None and state is None) else None
        tokenizer = _tokenizer(cfg, run_dir, info, state or init_state)
        losses = t.stage1_losses if stage == 1 else t.stage2_losses
        cfg = replace(cfg, model=replace(cfg.model, losses=list(losses)))
        if info.is_main:
            write_config(cfg, run_dir / "config.yaml")

        weights_from = state or init_state  # its weights replace the DINO and BERT inits: skip them
        model_cfg = ckpt.offline_model_config(cfg.model, ckpt.model_weights(weights_from)) if weights_from else cfg.model
        model = build_model(model_cfg, tokenizer=tokenizer)
        if cfg.model.text_pretrained and not cfg.model.text_config:  # checkpoints rebuild the text encoder offline
            cfg = replace(cfg, model=replace(cfg.model, text_config=model.text_encoder.config_dict()))
        if init_state is not None:  # the weights stage 1 is evaluated with: its moving average if it kept one
            missing, unexpected = model.load_state_dict(ckpt.model_weights(init_state), strict=False)
            if not any(k.startswith("momentum_encoder.") for k in init_state["model"]):
                model.reset_momentum()  # stage 1 had none: it starts as a copy of stage 1's encoder
            log.info("initialised from %s (missing %d keys, unexpected %d)", init, len(missing), len(unexpected))
        if stage == 2 and t.stage2_freeze_text:
            for p in model.text_encoder.parameters():
                p.requires_grad_(False)
        model.to(info.device)

        # ---- data ----
        table = load_samples(cfg.data.data_dir, with_pairs=stage == 2)
        in_batch = stage == 2 and t.stage2_pairs_in_batch
        dataset = CaptionImageDataset(table, model.tokenizer, model.image_size, stage, cfg.data, t.seed,
                                      mean=model.image_mean, std=model.image_std, pairs_in_batch=in_batch)
        sampler = ResumableSampler(len(dataset), info.rank, info.world_size, seed=t.seed)
        batch_size = t.stage2_batch_size if (stage == 2 and t.stage2_batch_size) else t.batch_size  # per process
        drawn = batch_size // 2 if in_batch else batch_size  # samples drawn per batch
        if drawn == 0:
            raise TrainingError("train.stage2_pairs_in_batch needs train.batch_size of at least 2")
        loader = make_loader(dataset, sampler, drawn, cfg.data.num_workers, pin_memory=info.device.type == "cuda")
        batches_per_epoch = len(sampler) // drawn
        if batches_per_epoch == 0:
            raise TrainingError(f"{len(dataset)} samples over {info.world_size} processes is less than one batch of {drawn}")

        # ---- optimiser and schedule ----
        global_batch = batch_size * info.world_size * cfg.optim.accum_steps
        rates = stage_rates(cfg, stage, global_batch)
        total_steps, warmup = stage_lengths(cfg, stage, max(1, batches_per_epoch // cfg.optim.accum_steps))
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay, cfg.optim.no_decay), lr=rates["lr"],
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = _schedule(optimizer, total_steps, warmup, rates["lr"], rates["min_lr"], rates["warmup_lr"],
                              cfg.optim.schedule)

        ema = _moving_average(model, t.ema_decay)
        step, epoch, batch_in_epoch = 0, 0, 0
        if state is not None:
            model.load_state_dict(state["model"])
            if ema is not None:
                ema.module.load_state_dict(state.get("ema") or state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["sampler"]["batch_in_epoch"]
            _set_rng_state(state["rng"])
            log.info("resumed %s at step %d", resume_path, step)
        metrics_path = run_dir / "metrics.jsonl"
        if info.is_main:
            _truncate_metrics(metrics_path, step)

        train_model = ddp_model = model
        if info.distributed:
            train_model = ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                find_unused_parameters=True)
        if t.compile:
            train_model = torch.compile(train_model)
        use_bf16 = info.device.type == "cuda" and t.precision == "bf16"

        def state_dict() -> dict[str, Any]:
            return {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                "sampler": {"batch_in_epoch": batch_in_epoch, "seed": t.seed},
                "ema": ema.module.state_dict() if ema is not None else None,
                "rng": _rng_state(), "config": to_dict(cfg),
                **ckpt.tokenizer_state(model.tokenizer),
                "stage": stage,
            }

        def save() -> Path | None:
            if info.is_main:
                return ckpt.save(state_dict(), run_dir, step, keep_last=t.keep_last)
            return None

        # ---- the loop ----
        seen = skipped = 0
        started = time.perf_counter()
        window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
        bar = _progress_bar(t.max_minutes, total_steps, step, stage, enabled=progress and info.is_main)
        stop_reason = "steps"
        last_parts: dict[str, float] = {}
        writer = _tensorboard(run_dir) if (t.tensorboard and info.is_main) else None
        model.train()
        micro = 0  # micro-batches since the last optimizer step (gradient accumulation)
        with _StopFlag() as stop:
            while step < total_steps:
                dataset.set_epoch(epoch)
                sampler.set_epoch(epoch, start=batch_in_epoch * drawn)
                fetch_start = time.perf_counter()
                for batch in loader:
                    data_wait += time.perf_counter() - fetch_start
                    batch_in_epoch += 1
                    # -- data: count what could not be read --
                    seen += batch["n_items"]
                    skipped += batch["n_skipped"]
                    too_many = _too_many_skipped(seen, skipped, cfg.data)
                    # decided on all ranks together, so that no rank is left waiting in a collective
                    too_many, empty = dist_utils.any_rank_each([too_many, "image" not in batch], info.device)
                    if too_many:
                        raise TrainingError(
                            f"{skipped} of {seen} samples could not be read ({100 * skipped / seen:.1f}% > "
                            f"{100 * cfg.data.max_skip_rate:.1f}%): check {cfg.data.data_dir}/downloads.parquet and the shards")
                    if empty:  # every sample of a batch (on some rank) unreadable: all ranks skip it
                        fetch_start = time.perf_counter()
                        continue
                    batch = normalize_images(_to_device(batch, info.device), model.image_mean, model.image_std)

                    # -- forward --
                    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
                    # DDP all-reduces gradients only on the micro-batch that ends an accumulation
                    accumulating = info.distributed and (micro + 1) % cfg.optim.accum_steps != 0
                    sync = ddp_model.no_sync if accumulating else nullcontext
                    with sync(), autocast:
                        parts = train_model(batch)
                    loss = parts["loss"]
                    # the mean over ranks: a non-finite loss on any rank stops every rank
                    if not torch.isfinite(dist_utils.all_reduce_mean(loss.detach().float())).all():
                        named = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                        raise TrainingError(f"non-finite loss at step {step}: {named}")

                    # -- backward and step --
                    with sync():
                        (loss / cfg.optim.accum_steps).backward()
                    micro += 1
                    window_samples += batch["image"].shape[0] * info.world_size
                    if micro % cfg.optim.accum_steps:
                        fetch_start = time.perf_counter()
                        continue
                    if cfg.optim.clip_grad:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    model.momentum_update()
                    if ema is not None:
                        ema.update(model, step=step)
                    step += 1
                    _advance(bar, step, total_steps, started, t.max_minutes)
                    last_parts = {k: float(dist_utils.all_reduce_mean(v.detach().float()).item())
                                  for k, v in parts.items()}

                    # -- logging --
                    if step % t.log_every == 0 or step == total_steps:
                        elapsed = time.perf_counter() - window_start
                        record = {"step": step, "epoch": epoch, "stage": stage,
                                  "lr": scheduler.get_last_lr()[0],
                                  "samples_per_s": window_samples / max(elapsed, 1e-9),
                                  "data_wait_s": data_wait, "skipped": skipped,
                                  **{f"loss/{k}": v for k, v in last_parts.items()}}
                        if info.is_main:
                            with open(metrics_path, "a") as f:
                                f.write(json.dumps(record) + "\n")
                            bar.set_postfix(loss=f"{last_parts['loss']:.3f}",
                                            sps=f"{record['samples_per_s']:.0f}", lr=f"{record['lr']:.2e}")
                            parts_text = " ".join(f"{k}={v:.4f}" for k, v in last_parts.items())
                            tqdm.write(f"stage {stage} step {step}/{total_steps} {record['samples_per_s']:.1f} samples/s "
                                       f"lr {record['lr']:.3e} {parts_text} data wait {record['data_wait_s']:.2f}s "
                                       f"skipped {skipped}")
                            if writer is not None:
                                for key, value in record.items():
                                    if key not in ("step", "stage"):
                                        writer.add_scalar(f"stage{stage}/{key}", value, step)
                        window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                    if eval_fn is not None and t.eval_every and step % t.eval_every == 0 and info.is_main:
                        evaluated = ema.module if ema is not None else model
                        evaluated.eval()
                        result = eval_fn(evaluated, step)
                        model.train()
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps({"step": step, "stage": stage, **{f"val/{k}": v for k, v in result.items()}}) + "\n")

                    # -- checkpoints and stopping --
                    out_of_time = t.max_minutes is not None and (time.perf_counter() - started) / 60 >= t.max_minutes
                    if dist_utils.any_rank(stop.raised or out_of_time, info.device):
                        stop_reason = "signal" if stop.raised else "time"
                        break
                    if step % t.ckpt_every == 0 and step < total_steps:
                        save()
                    if step >= total_steps:
                        break
                    fetch_start = time.perf_counter()
                else:
                    epoch += 1
                    batch_in_epoch = 0
                    continue
                break
        bar.close()
        if writer is not None:
            writer.close()
        final = save()
        dist_utils.barrier()
        # the end of the run decides on every sample seen, however few (a short run never reached the check)
        if dist_utils.any_rank(seen > 0 and skipped / seen > cfg.data.max_skip_rate, info.device):
            raise TrainingError(
                f"{skipped} of {seen} samples could not be read ({100 * skipped / max(seen, 1):.1f}% > "
                f"{100 * cfg.data.max_skip_rate:.1f}%): check {cfg.data.data_dir}/downloads.parquet and the shards "
                f"(the run's last checkpoint is {final})")
        return {"step": step, "epoch": epoch, "stop": stop_reason, "skipped": skipped, "seen": seen,
                "losses": last_parts, "checkpoint": str(final) if final else None,
                "minutes": (time.perf_counter() - started) / 60}
    finally:
        dist_utils.teardown()


def train_both(cfg: RunConfig, run_dir: Path, eval_fn: EvalFn | None = None, progress: bool = True) -> dict[str, Any]:
    """Stage 1 into RUN/stage1, then stage 2 into RUN/stage2 from stage 1's last checkpoint."""
    run_dir = Path(run_dir)
    first = train(replace(cfg, train=replace(cfg.train, stage=1)), run_dir / "stage1", eval_fn=eval_fn, progress=progress)
    if first["stop"] != "steps":
        return {"stage1": first}
    second = train(replace(cfg, train=replace(cfg.train, stage=2)), run_dir / "stage2",
                   init=run_dir / "stage1" / "last.pt", eval_fn=eval_fn, progress=progress)
    return {"stage1": first, "stage2": second}
