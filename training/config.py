"""The run configuration: typed dataclasses with defaults in code, a named YAML preset on top,
an optional YAML file on top of that, then `key.sub=value` overrides from the command line.
The resolved config (with the git SHA) is written into the run folder and every checkpoint."""

from __future__ import annotations

import dataclasses
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ovseg.training.model import ModelConfig


@dataclass
class DataConfig:
    """Where the curated data lives and how samples become tensors."""

    data_dir: str = ""  # the DATA folder of `ovseg curate` (local path or fsspec URL)
    max_text_length: int = 32
    num_workers: int = 0
    prompt_template: str = "a photo of a {}."
    max_entities: int = 3  # masked entities per caption given a prompt of their own (grounding loss)
    tokenizer: str | None = None  # a tokenizer directory; None: train WordPiece on the captions
    tokenizer_vocab_size: int = 4000
    # stage 1 (DeiT-style) and stage 2 augmentations, as the public code's configs have them
    crop_scale_min: float = 0.08
    stage2_crop_scale_min: float = 0.4
    hflip: float = 0.5
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    random_erasing: float = 0.25
    erasing_mode: str = "pixel"  # pixel: noise that is N(0, 1) once normalised; const: the mean colour
    interpolation: str = "bilinear"  # of the crops' resize and RandAugment's geometric ops (or bicubic)
    max_skip_rate: float = 0.05  # stop when more than this share of samples cannot be read
    min_samples_for_skip_check: int = 200


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule. `lr`, `warmup_lr` and `min_lr` are given at a
    global batch of 4096 and, with `scale_lr`, each scaled by global batch / 4096."""

    lr: float = 1.6e-3  # stage 1's peak learning rate
    scale_lr: bool = True
    min_lr: float = 1e-6  # the cosine's end
    warmup_lr: float = 0.0  # where the warm-up starts ("official" schedule; "ovseg" starts at lr / warmup)
    warmup_steps: int = 100
    warmup_epochs: float | None = None  # when set, the warm-up in epochs of the run's data
    # "official": timm's CosineLRScheduler as the public code runs it (cosine over every step,
    # warm-up included); "ovseg": warm-up, then cosine over the remaining steps
    schedule: str = "ovseg"
    weight_decay: float = 0.05
    # parameters without weight decay: "official" (1-d parameters and biases) or "ovseg" (also
    # 0-d parameters such as the logit scale, tokens and position embeddings)
    no_decay: str = "ovseg"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    clip_grad: float = 5.0
    accum_steps: int = 1
    # stage 2's own learning rates and warm-up (None: stage 1's; its peak then lr x train.stage2_lr_factor)
    stage2_lr: float | None = None
    stage2_warmup_lr: float | None = None
    stage2_min_lr: float | None = None
    stage2_warmup_steps: int | None = None
    stage2_warmup_epochs: float | None = None


@dataclass
class TrainConfig:
    stage: int = 1  # 1: contrastive + entity (+ grounding); 2: adds mask consistency, text encoder frozen
    stage1_losses: list[str] = field(default_factory=lambda: ["contrastive", "entity", "grounding"])
    stage2_losses: list[str] = field(default_factory=lambda: ["contrastive", "entity", "grounding", "mask"])
    batch_size: int = 32  # per process
    stage2_batch_size: int | None = None  # per process in stage 2 (None: batch_size)
    steps: int = 1000
    stage2_steps: int = 500
    # when set, a stage's length in epochs of the run's data (replaces steps / stage2_steps)
    epochs: float | None = None
    stage2_epochs: float | None = None
    stage2_lr_factor: float = 0.1  # stage 2's learning rate relative to stage 1's (unless optim.stage2_lr)
    # stage 2 with the partners in the batch: batch_size / 2 images and their partners, every
    # one trained on by every loss, so a stage-2 step costs about what a stage-1 step does.
    # False: batch_size images, each with an extra partner that only the mask loss sees
    stage2_pairs_in_batch: bool = False
    stage2_freeze_text: bool = True  # the paper's stage 2 trains the image side only
    max_minutes: float | None = None  # stop (and checkpoint) after this much training time
    # decay per step of a moving average of the weights (timm's ModelEmaV3, with warm-up), kept
    # beside the model and saved in every checkpoint; evaluation, `segment` and stage 2's init
    # use it. 0: none. It averages out the noise of a constant learning rate, which runs
    # stopped by the clock (train.max_minutes) have
    ema_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"  # bf16 autocast on CUDA; CPUs run fp32
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    eval_every: int = 0  # 0: no periodic validation
    tensorboard: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""
    git_sha: str = ""


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclasses."""


def _from_dict(cls, values: dict[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in known:
            raise ConfigError(f"unknown config key '{where}{key}'; known: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = _from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _typed(hint, value, f"{where}{key}")
    return cls(**kwargs)


def _typed(hint, value, key: str):
    """`value` as the field's type: YAML 1.1 reads `3e-3` as a string, and a config that
    silently carried one would fail much later (or train with the wrong value). Numbers are
    converted (an int field takes only whole numbers), anything else that does not fit is a
    ConfigError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _typed(options[0], value, key) if len(options) == 1 else value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if len(items) != len(value):
            raise ConfigError(f"config key '{key}' wants {len(items)} values, got {value!r}")
        typed = [_typed(h, v, f"{key}[{i}]") for i, (h, v) in enumerate(zip(items, value))]
        return tuple(typed) if origin is tuple else typed
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _typed(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' wants true or false, got {value!r}")
        return value
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"config key '{key}' wants a number, got {value!r}")
        if hint is int:
            if not float(number).is_integer():
                raise ConfigError(f"config key '{key}' wants a whole number, got {value!r}")
            return int(number)
        return float(number)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def to_dict(config) -> dict[str, Any]:
    """Plain dicts, lists, strings and numbers: what YAML, JSON and weights-only loading take."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`train.steps=100` -> {"train": {"steps": 100}}; values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def resolve(preset: str | None = None, config_file: Path | None = None,
            overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> RunConfig:
    """Defaults < preset < config file < overrides (< nothing). `base` replaces the preset
    (used when resuming: the saved config is the base)."""
    from ovseg.training.presets import get_preset

    values: dict[str, Any] = dict(base or {})
    if preset and base is None:
        values = deep_merge(get_preset(preset), {"preset": preset})
    if config_file is not None:
        values = deep_merge(values, yaml.safe_load(Path(config_file).read_text()) or {})
    for text in overrides:
        values = deep_merge(values, parse_override(text))
    values.pop("git_sha", None)
    config = _from_dict(RunConfig, values)
    for key, value, choices in (("optim.schedule", config.optim.schedule, ("official", "ovseg")),
                                ("optim.no_decay", config.optim.no_decay, ("official", "ovseg")),
                                ("model.decoder", config.model.decoder, ("official", "ovseg")),
                                ("model.mask_form", config.model.mask_form, ("official", "ovseg"))):
        if value not in choices:
            raise ConfigError(f"config key '{key}' wants one of {', '.join(choices)}, got {value!r}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' wants a decay in [0, 1), got {config.train.ema_decay}")
    config.git_sha = git_sha()
    return config


def write_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
