"""The training loop: one code path for one CPU process and for N GPUs on M nodes (torchrun).

Read top to bottom: helpers, then the loop in parts: `setup_run` builds a `RunState` (model,
data, optimiser, schedule, moving average, resume), `step_batches` yields each optimiser step's
micro-batches (epochs, resume, unreadable samples), `train_step` takes one step, `log_step`,
`evaluate` and `save` record it, and `train` strings them together for one stage;
`train_stages` runs every stage of `train.stages` in order.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from ovseg.training import checkpoint as ckpt
from ovseg.training import distributed as dist_utils
from ovseg.training.config import RunConfig, StageConfig, to_dict, write_config
from ovseg.training.data import (
    CaptionImageDataset, ResumableSampler, captions_for_tokenizer, collate, load_samples, make_loader, normalize_images,
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


def stage_rates(cfg: RunConfig, stage: StageConfig, global_batch: int) -> dict[str, float]:
    """A stage's peak, warm-up start and final learning rates: its own where it sets them, else
    `optim.lr` times its `lr_factor` and the optimiser's warm-up and final rates. With
    `optim.scale_lr` each is scaled by global batch / 4096."""
    o = cfg.optim
    base = stage.lr if stage.lr is not None else o.lr * stage.lr_factor
    warmup_lr = stage.warmup_lr if stage.warmup_lr is not None else o.warmup_lr
    min_lr = stage.min_lr if stage.min_lr is not None else o.min_lr
    scale = global_batch / 4096 if o.scale_lr else 1.0
    return {"lr": base * scale, "warmup_lr": warmup_lr * scale, "min_lr": min_lr * scale}


def stage_lengths(cfg: RunConfig, stage: StageConfig, steps_per_epoch: int) -> tuple[int, int]:
    """A stage's optimiser steps and warm-up steps: in epochs of the run's data where the stage
    (or, for the warm-up, the optimiser) gives them, else in steps. A stage that sets
    `warmup_steps` and no `warmup_epochs` takes its steps over the optimiser's epochs."""
    o = cfg.optim
    warm_epochs = stage.warmup_epochs if stage.warmup_epochs is not None else (
        o.warmup_epochs if stage.warmup_steps is None else None)
    warm_steps = stage.warmup_steps if stage.warmup_steps is not None else o.warmup_steps
    total = int(stage.epochs * steps_per_epoch) if stage.epochs is not None else stage.steps
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
    t, o = cfg.train, cfg.optim
    stage = t.current()
    key = f"train.stages.{t.stage}"
    problems = []
    if stage.epochs is None and stage.steps < 1:
        problems.append(f"{key}.steps must be at least 1, not {stage.steps}")
    if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
        problems.append(f"optim.lr must be a finite number above 0, not {o.lr}")
    if not (isinstance(o.min_lr, (int, float)) and math.isfinite(o.min_lr) and o.min_lr >= 0):
        problems.append(f"optim.min_lr must be a finite number of 0 or more, not {o.min_lr}")
    if t.batch_size < 1:
        problems.append(f"train.batch_size must be at least 1, not {t.batch_size}")
    if stage.batch_size is not None and stage.batch_size < 1:
        problems.append(f"{key}.batch_size must be at least 1, not {stage.batch_size}")
    if o.accum_steps < 1:
        problems.append(f"optim.accum_steps must be at least 1, not {o.accum_steps}")
    if o.contrastive_cache and t.noise != "per_sample":
        problems.append("optim.contrastive_cache needs train.noise=per_sample (the re-run of a micro-batch "
                        "must draw the noise its first pass drew)")
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


@dataclass
class RunState:
    """Everything a stage's loop reads and advances: built by `setup_run`, saved by `save`."""

    cfg: RunConfig
    info: Any  # dist_utils.DistInfo
    stage: StageConfig
    run_dir: Path
    model: torch.nn.Module  # the OVSegmentor itself (saved, evaluated)
    train_model: torch.nn.Module  # what the forward runs through: the model, or its DDP / compiled wrapper
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any  # timm ModelEmaV3 or None
    dataset: CaptionImageDataset
    sampler: ResumableSampler
    loader: Any
    drawn: int  # samples drawn per micro-batch (half the batch with partners in the batch)
    total_steps: int
    use_bf16: bool
    metrics_path: Path
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already drawn
    seen: int = 0
    skipped: int = 0
    data_wait: float = 0.0  # seconds spent waiting for data since the last log line

    @property
    def number(self) -> int:
        return self.cfg.train.stage

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
            "sampler": {"batch_in_epoch": self.batch_in_epoch, "seed": self.cfg.train.seed},
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": _rng_state(), "config": to_dict(self.cfg),
            **ckpt.tokenizer_state(self.model.tokenizer),
            "stage": self.number,
        }


def setup_run(cfg: RunConfig, run_dir: Path, info, init: Path | None = None) -> RunState:
    """For this process (`info`, from `dist_utils.setup`): the tokenizer, model, data, optimiser, schedule and moving average of the stage
    `cfg.train.stage`, resumed from the newest checkpoint in `run_dir` if it holds one, else
    initialised from `init` (the previous stage's checkpoint) when given."""
    from ovseg.training.model import build_model

    t = cfg.train
    stage = t.current()
    torch.manual_seed(t.seed + info.rank)

    resume_path = ckpt.latest(run_dir)
    state = ckpt.load(resume_path) if resume_path else None
    init_state = ckpt.load(init) if (init is not None and state is None) else None
    tokenizer = _tokenizer(cfg, run_dir, info, state or init_state)
    cfg = replace(cfg, model=replace(cfg.model, losses=list(stage.losses)))  # the model builds the stage's losses

    weights_from = state or init_state  # its weights replace the DINO and BERT inits: skip them
    model_cfg = ckpt.offline_model_config(cfg.model, ckpt.model_weights(weights_from)) if weights_from else cfg.model
    # weighted as the stage says; the saved config keeps model.loss_weights as set (a config file
    # copied from this stage must not carry its weights into the next)
    model_cfg = replace(model_cfg, loss_weights={**model_cfg.loss_weights, **(stage.loss_weights or {})})
    model = build_model(model_cfg, tokenizer=tokenizer)
    if cfg.model.text_pretrained and not cfg.model.text_config:  # checkpoints rebuild the text encoder offline
        cfg = replace(cfg, model=replace(cfg.model, text_config=model.text_encoder.config_dict()))
    if init_state is not None:  # the weights the previous stage is evaluated with: its moving average if it kept one
        missing, unexpected = model.load_state_dict(ckpt.model_weights(init_state), strict=False)
        if not any(k.startswith("momentum_encoder.") for k in init_state["model"]):
            model.reset_momentum()  # the previous stage had none: it starts as a copy of its encoder
        log.info("initialised from %s (missing %d keys, unexpected %d)", init, len(missing), len(unexpected))
    if stage.freeze_text:
        for p in model.text_encoder.parameters():
            p.requires_grad_(False)
    if t.sync_batch_norm and info.distributed:
        from ovseg.training.model.projector import set_sync_stats

        set_sync_stats(model)
    model.to(info.device)

    table = load_samples(cfg.data.data_dir, with_pairs=stage.partners != "none")
    dataset = CaptionImageDataset(table, model.tokenizer, model.image_size, stage, cfg.data, t.seed,
                                  mean=model.image_mean, std=model.image_std)
    sampler = ResumableSampler(len(dataset), info.rank, info.world_size, seed=t.seed)
    use_bf16 = info.device.type == "cuda" and t.precision == "bf16"
    batch_size = stage.batch_size or t.batch_size  # per process
    if stage.global_batch:
        plan = _batch_plan(cfg, stage, dataset, model, info, use_bf16)
        batch_size = plan.micro_batch
        stages = list(t.stages)
        stages[t.stage - 1] = stage = replace(stage, batch_size=plan.micro_batch)
        cfg = replace(cfg, train=replace(t, stages=stages), optim=replace(cfg.optim, accum_steps=plan.accum_steps))
        t = cfg.train
        if info.is_main:
            tqdm.write(f"stage {t.stage}: {plan.describe()}")
    drawn = batch_size // 2 if stage.partners == "in_batch" else batch_size
    if drawn == 0:
        raise TrainingError(f"train.stages.{t.stage}.partners=in_batch needs a batch of at least 2")
    loader = make_loader(dataset, sampler, drawn, cfg.data.num_workers, pin_memory=info.device.type == "cuda")
    batches_per_epoch = len(sampler) // drawn
    if batches_per_epoch == 0:
        raise TrainingError(f"{len(dataset)} samples over {info.world_size} processes is less than one batch of {drawn}")

    global_batch = batch_size * info.world_size * cfg.optim.accum_steps
    rates = stage_rates(cfg, stage, global_batch)
    total_steps, warmup = stage_lengths(cfg, stage, max(1, batches_per_epoch // cfg.optim.accum_steps))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay, cfg.optim.no_decay), lr=rates["lr"],
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = _schedule(optimizer, total_steps, warmup, rates["lr"], rates["min_lr"], rates["warmup_lr"],
                          cfg.optim.schedule)
    ema = _moving_average(model, t.ema_decay)

    train_model = ddp_model = model
    if info.distributed:
        train_model = ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=True)
    if t.compile:
        train_model = torch.compile(train_model)
    run = RunState(cfg=cfg, info=info, stage=stage, run_dir=run_dir, model=model, train_model=train_model,
                   ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler, ema=ema, dataset=dataset,
                   sampler=sampler, loader=loader, drawn=drawn, total_steps=total_steps,
                   use_bf16=use_bf16, metrics_path=run_dir / "metrics.jsonl")
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state.get("ema") or state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run.step, run.epoch, run.batch_in_epoch = state["step"], state["epoch"], state["sampler"]["batch_in_epoch"]
        _set_rng_state(state["rng"])
        log.info("resumed %s at step %d", resume_path, run.step)
    if info.is_main:
        write_config(cfg, run_dir / "config.yaml")
        _truncate_metrics(run.metrics_path, run.step)
    return run


def _batch_plan(cfg: RunConfig, stage: StageConfig, dataset: CaptionImageDataset, model, info, use_bf16: bool):
    """The split of the stage's global batch over the processes and micro-batches: a memory
    probe on the stage's own samples picks the micro-batch on CUDA unless optim.micro_batch
    gives it."""
    from ovseg.training.batching import BatchError, cuda_fits, plan_batch

    fits = None
    if info.device.type == "cuda" and cfg.optim.micro_batch is None:
        def batch_of(size: int) -> dict[str, Any]:
            drawn = max(1, size // 2) if stage.partners == "in_batch" else size
            items = [dataset[i % len(dataset)] for i in range(drawn)]
            return normalize_images(_to_device(collate(items), info.device), model.image_mean, model.image_std)

        fits = cuda_fits(model, batch_of, use_bf16, agree=lambda ok: not dist_utils.any_rank(not ok, info.device))
    try:
        return plan_batch(stage.global_batch, info.world_size, cfg.optim.micro_batch, fits,
                          key=f"train.stages.{cfg.train.stage}.global_batch")
    except BatchError as error:
        raise TrainingError(str(error)) from error


def step_batches(run: RunState) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of each optimiser step (`optim.accum_steps` of them), on the device and
    normalised, from where the run stands (epoch and batch, so a resumed run sees what it would
    have seen). Counts unreadable samples, stops the run when too many are, and skips a batch
    that some rank could not read at all (on every rank, so no rank waits in a collective)."""
    cfg, info, k = run.cfg, run.info, run.cfg.optim.accum_steps
    pending: list[dict[str, Any]] = []
    while True:
        run.dataset.set_epoch(run.epoch)
        run.sampler.set_epoch(run.epoch, start=run.batch_in_epoch * run.drawn)
        fetch_start = time.perf_counter()
        for batch in run.loader:
            run.data_wait += time.perf_counter() - fetch_start
            run.batch_in_epoch += 1
            run.seen += batch["n_items"]
            run.skipped += batch["n_skipped"]
            too_many = _too_many_skipped(run.seen, run.skipped, cfg.data)
            too_many, empty = dist_utils.any_rank_each([too_many, "image" not in batch], info.device)
            if too_many:
                raise TrainingError(
                    f"{run.skipped} of {run.seen} samples could not be read ({100 * run.skipped / run.seen:.1f}% > "
                    f"{100 * cfg.data.max_skip_rate:.1f}%): check {cfg.data.data_dir}/downloads.parquet and the shards")
            if not empty:
                pending.append(normalize_images(_to_device(batch, info.device), run.model.image_mean,
                                                run.model.image_std))
            if len(pending) == k:
                yield pending
                pending = []
            fetch_start = time.perf_counter()
        run.epoch += 1
        run.batch_in_epoch = 0


def step_seed(seed: int, step: int) -> int:
    """The seed of optimiser step `step`: with each sample's id it keys the model's noise
    (`noise.batch_seeds`), the same on every rank and after a resume."""
    return seed * 1_000_003 + step


def train_step(run: RunState, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
    """One optimiser step over `micro_batches` (forward, backward, clip, step, schedule, momentum
    encoder, moving average). With `optim.contrastive_cache` the k micro-batches give the
    gradient of one batch of all of them (`gradcache.cached_step`); otherwise each is its own
    batch and their gradients are averaged (plain accumulation). The model's noise is drawn per
    sample (`train.noise`), so a sample's noise does not depend on its micro-batch or rank.
    Returns each loss over the whole step: over all its micro-batches, averaged over ranks."""
    from ovseg.training import gradcache
    from ovseg.training.model import noise

    info, k, cfg = run.info, len(micro_batches), run.cfg
    seed = step_seed(cfg.train.seed, run.step)
    per_sample = cfg.train.noise == "per_sample"

    def noisy(batch):
        return noise.per_sample(noise.batch_seeds(batch, seed), seed) if per_sample else nullcontext()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.use_bf16 else nullcontext()
    if cfg.optim.contrastive_cache and k > 1:  # one micro-batch is already the whole batch
        # the bare model, outside DDP's hooks; the gradients are averaged over ranks after
        with (run.ddp_model.no_sync() if info.distributed else nullcontext()), autocast:
            totals = {name: value.float() for name, value in gradcache.cached_step(run.model, micro_batches, seed).items()}
        _check_finite(run, totals)
        if info.distributed:
            dist_utils.average_gradients(run.model.parameters())
    else:
        totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            # DDP all-reduces gradients only on the micro-batch that ends the step
            sync = run.ddp_model.no_sync if (info.distributed and index < k - 1) else nullcontext
            with sync():
                with autocast, noisy(batch):
                    parts = run.train_model(batch)
                _check_finite(run, parts)
                (parts["loss"] / k).backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / k
    if cfg.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.model.momentum_update()
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    run.step += 1
    return {name: float(dist_utils.all_reduce_mean(value).item()) for name, value in totals.items()}


def _check_finite(run: RunState, parts: dict[str, torch.Tensor]) -> None:
    """The mean over ranks: a non-finite loss on any rank stops every rank."""
    if not torch.isfinite(dist_utils.all_reduce_mean(parts["loss"].detach().float())).all():
        named = ", ".join(f"{name}={value.item():.4g}" for name, value in parts.items())
        raise TrainingError(f"non-finite loss at step {run.step}: {named}")


def log_step(run: RunState, losses: dict[str, float], samples_per_s: float, bar, writer) -> None:
    """One line of metrics.jsonl (main process), the console line and TensorBoard's scalars."""
    if not run.info.is_main:
        return
    record = {"step": run.step, "epoch": run.epoch, "stage": run.number, "lr": run.scheduler.get_last_lr()[0],
              "samples_per_s": samples_per_s, "data_wait_s": run.data_wait, "skipped": run.skipped,
              **{f"loss/{name}": value for name, value in losses.items()}}
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{losses['loss']:.3f}", sps=f"{samples_per_s:.0f}", lr=f"{record['lr']:.2e}")
    parts = " ".join(f"{name}={value:.4f}" for name, value in losses.items())
    tqdm.write(f"stage {run.number} step {run.step}/{run.total_steps} {samples_per_s:.1f} samples/s "
               f"lr {record['lr']:.3e} {parts} data wait {run.data_wait:.2f}s skipped {run.skipped}")
    if writer is not None:
        for key, value in record.items():
            if key not in ("step", "stage"):
                writer.add_scalar(f"stage{run.number}/{key}", value, run.step)


def evaluate(run: RunState, eval_fn: EvalFn) -> None:
    """Validation of the weights that evaluation uses (the moving average when kept), logged."""
    evaluated = run.ema.module if run.ema is not None else run.model
    evaluated.eval()
    result = eval_fn(evaluated, run.step)
    run.model.train()
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps({"step": run.step, "stage": run.number, **{f"val/{k}": v for k, v in result.items()}}) + "\n")


def save(run: RunState) -> Path | None:
    """A checkpoint of the run as it stands (main process; None on the others)."""
    if run.info.is_main:
        return ckpt.save(run.state_dict(), run.run_dir, run.step, keep_last=run.cfg.train.keep_last)
    return None


def train(cfg: RunConfig, run_dir: Path, init: Path | None = None, eval_fn: EvalFn | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train the stage `cfg.train.stage` into `run_dir`; resume if it holds a checkpoint. A
    later stage starts from `init` (the previous stage's checkpoint) unless it resumes. Returns
    a summary."""
    run_dir = Path(run_dir)
    info = dist_utils.setup(cfg.train.device)
    _check_settings(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        run = setup_run(cfg, run_dir, info, init)
        t = run.cfg.train
        started = time.perf_counter()
        window_start, window_samples = time.perf_counter(), 0
        bar = _progress_bar(t.max_minutes, run.total_steps, run.step, run.number,
                            enabled=progress and run.info.is_main)
        stop_reason = "steps"
        losses: dict[str, float] = {}
        writer = _tensorboard(run_dir) if (t.tensorboard and run.info.is_main) else None
        run.model.train()
        with _StopFlag() as stop:
            batches = step_batches(run)
            while run.step < run.total_steps:
                micro_batches = next(batches)
                losses = train_step(run, micro_batches)
                window_samples += sum(b["image"].shape[0] for b in micro_batches) * run.info.world_size
                _advance(bar, run.step, run.total_steps, started, t.max_minutes)
                if run.step % t.log_every == 0 or run.step == run.total_steps:
                    log_step(run, losses, window_samples / max(time.perf_counter() - window_start, 1e-9), bar, writer)
                    window_start, window_samples, run.data_wait = time.perf_counter(), 0, 0.0
                if eval_fn is not None and t.eval_every and run.step % t.eval_every == 0 and run.info.is_main:
                    evaluate(run, eval_fn)
                out_of_time = t.max_minutes is not None and (time.perf_counter() - started) / 60 >= t.max_minutes
                if dist_utils.any_rank(stop.raised or out_of_time, run.info.device):
                    stop_reason = "signal" if stop.raised else "time"
                    break
                if run.step % t.ckpt_every == 0 and run.step < run.total_steps:
                    save(run)
        bar.close()
        if writer is not None:
            writer.close()
        final = save(run)
        dist_utils.barrier()
        # the end of the run decides on every sample seen, however few (a short run never reached the check)
        if dist_utils.any_rank(run.seen > 0 and run.skipped / run.seen > cfg.data.max_skip_rate, run.info.device):
            raise TrainingError(
                f"{run.skipped} of {run.seen} samples could not be read ({100 * run.skipped / max(run.seen, 1):.1f}% > "
                f"{100 * cfg.data.max_skip_rate:.1f}%): check {cfg.data.data_dir}/downloads.parquet and the shards "
                f"(the run's last checkpoint is {final})")
        return {"step": run.step, "epoch": run.epoch, "stop": stop_reason, "skipped": run.skipped, "seen": run.seen,
                "losses": losses, "checkpoint": str(final) if final else None,
                "minutes": (time.perf_counter() - started) / 60}
    finally:
        dist_utils.teardown()


def train_stages(cfg: RunConfig, run_dir: Path, eval_fn: EvalFn | None = None, progress: bool = True) -> dict[str, Any]:
    """Every stage of `train.stages` in order, stage N into RUN/stageN from stage N-1's last
    checkpoint. Stops after a stage that did not finish its steps (time budget, signal)."""
    run_dir = Path(run_dir)
    summary: dict[str, Any] = {}
    for number in range(1, len(cfg.train.stages) + 1):
        init = run_dir / f"stage{number - 1}" / "last.pt" if number > 1 else None
        result = train(replace(cfg, train=replace(cfg.train, stage=number)), run_dir / f"stage{number}",
                       init=init, eval_fn=eval_fn, progress=progress)
        summary[f"stage{number}"] = result
        if result["stop"] != "steps":
            break
    return summary
