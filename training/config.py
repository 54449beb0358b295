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
    # the "deit" augmentations (a stage's `augment`), as the public code's configs have them;
    # the crop scale is the stage's own (`train.stages[i].crop`)
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
    accum_steps: int = 1  # micro-batches per optimiser step
    contrastive_cache: bool = False  # accum_steps as one exact large batch (gradient caching, training/gradcache.py)
    # a stage with a global_batch: samples per micro-batch (None: the largest that fits on CUDA,
    # the whole per-process batch elsewhere)
    micro_batch: int | None = None


STAGE_PARTNERS = ("none", "extra", "in_batch")
STAGE_AUGMENTS = ("deit", "crop_flip")


@dataclass
class StageConfig:
    """One training stage. Fields left None take the run's own setting (`train.batch_size`,
    `optim.lr` x `lr_factor`, `optim.warmup_*`, `optim.min_lr`)."""

    losses: list[str] = field(default_factory=lambda: ["contrastive", "entity"])
    # weights that replace model.loss_weights' for this stage only (e.g. {contrastive: 0.1}); the
    # losses not named keep the model's
    loss_weights: dict[str, float] | None = None
    steps: int = 1000
    epochs: float | None = None  # when set, the stage's length in epochs of the run's data (replaces steps)
    batch_size: int | None = None  # per process
    # when set, the stage's batch over every process and micro-batch (replaces batch_size and
    # optim.accum_steps): global_batch / processes per process, in micro-batches of
    # optim.micro_batch, or of the largest size a memory probe finds to fit on CUDA
    global_batch: int | None = None
    lr: float | None = None  # peak learning rate at a global batch of 4096 (scaled as optim.lr is)
    lr_factor: float = 1.0  # with lr None: optim.lr times this
    warmup_lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    # in epochs of the run's data; None: optim.warmup_epochs unless the stage gives warmup_steps
    warmup_epochs: float | None = None
    crop: float = 0.08  # smallest scale of the random resized crop
    # "deit": crop, flip, RandAugment, colour jitter and erasing (the `data` settings);
    # "crop_flip": crop and flip only (the public code's stage 2)
    augment: str = "deit"
    freeze_text: bool = False  # train the image side only (the paper's stage 2)
    # the image that shares an entity, which the mask loss reads. "none"; "extra": each sample
    # brings a partner image that only the mask loss sees (the public code); "in_batch": half
    # the batch are images and half their partners, every one trained on by every loss, so a
    # step costs about what a stage without partners costs
    partners: str = "none"


def _default_stages() -> list[StageConfig]:
    return [StageConfig(losses=["contrastive", "entity", "grounding"], steps=1000),
            StageConfig(losses=["contrastive", "entity", "grounding", "mask"], steps=500, lr_factor=0.1, crop=0.4,
                        augment="crop_flip", freeze_text=True, partners="extra")]


@dataclass
class TrainConfig:
    # the stages, trained in order (`ovseg train --stage both` runs them all; `--stage N` the
    # N-th, counted from 1); overrides name one by number: train.stages.2.steps=300
    stages: list[StageConfig] = field(default_factory=_default_stages)
    stage: int = 1  # the stage this process trains (set by `ovseg train --stage`)
    batch_size: int = 32  # per process, for stages that do not set their own
    max_minutes: float | None = None  # stop (and checkpoint) after this much training time
    # decay per step of a moving average of the weights (timm's ModelEmaV3, with warm-up), kept
    # beside the model and saved in every checkpoint; evaluation, `segment` and the next
    # stage's init use it. 0: none. It averages out the noise of a constant learning rate, which
    # runs stopped by the clock (train.max_minutes) have
    ema_decay: float = 0.0
    seed: int = 0
    # the model's noise (Gumbel, dropout, drop path): "per_sample", drawn from each sample's id
    # and the step (training/model/noise.py), so a sample's noise does not depend on its batch,
    # micro-batch or rank; "global": torch's global random stream
    noise: str = "per_sample"
    # under torchrun, the projectors' batch norm takes the statistics of every process (the
    # official code's SyncBN); false: each process's own, as plain DDP gives
    sync_batch_norm: bool = False
    device: str = "auto"
    precision: str = "bf16"  # bf16 autocast on CUDA; CPUs run fp32
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    eval_every: int = 0  # 0: no periodic validation
    tensorboard: bool = False

    def current(self) -> StageConfig:
        """The stage this process trains."""
        if not 1 <= self.stage <= len(self.stages):
            raise ConfigError(f"train.stage {self.stage} is not one of the {len(self.stages)} stages in train.stages")
        return self.stages[self.stage - 1]


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
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _from_dict(hint, value, f"{key}.")
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


def deep_merge(base: dict, update: dict, where: str = "") -> dict:
    """`update` over `base`, dicts merged key by key. A list in `base` takes a dict whose keys
    are item numbers counted from 1 (`train.stages.2.steps=300` sets the second stage's steps;
    one past the end appends an item)."""
    out = dict(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, f"{where}{key}.")
        elif isinstance(value, dict) and isinstance(out.get(key), list):
            out[key] = _merge_items(out[key], value, f"{where}{key}")
        else:
            out[key] = value
    return out


def _merge_items(items: list, update: dict, key: str) -> list:
    out = list(items)
    for number, value in sorted(update.items(), key=lambda kv: str(kv[0])):
        index = int(number) if str(number).isdigit() else 0
        if not 1 <= index <= len(out) + 1:
            raise ConfigError(f"config key '{key}.{number}': {key} has {len(out)} items, numbered from 1")
        if index == len(out) + 1:
            out.append({})
        current = out[index - 1]
        if isinstance(value, dict) and isinstance(current, dict):
            out[index - 1] = deep_merge(current, value, f"{key}.{number}.")
        else:
            out[index - 1] = value
    return out


# the keys that the stage list replaced, as the key that now says it; a saved config (a run
# folder or checkpoint from before the list) is read through `_migrate_stages`
LEGACY_STAGE_KEYS = {
    "train.stage1_losses": "train.stages.1.losses", "train.stage2_losses": "train.stages.2.losses",
    "train.steps": "train.stages.1.steps", "train.stage2_steps": "train.stages.2.steps",
    "train.epochs": "train.stages.1.epochs", "train.stage2_epochs": "train.stages.2.epochs",
    "train.stage2_batch_size": "train.stages.2.batch_size", "train.stage2_lr_factor": "train.stages.2.lr_factor",
    "train.stage2_pairs_in_batch": "train.stages.2.partners=in_batch",
    "train.stage2_freeze_text": "train.stages.2.freeze_text",
    "optim.stage2_lr": "train.stages.2.lr", "optim.stage2_warmup_lr": "train.stages.2.warmup_lr",
    "optim.stage2_min_lr": "train.stages.2.min_lr", "optim.stage2_warmup_steps": "train.stages.2.warmup_steps",
    "optim.stage2_warmup_epochs": "train.stages.2.warmup_epochs",
    "data.crop_scale_min": "train.stages.1.crop", "data.stage2_crop_scale_min": "train.stages.2.crop",
}


def _legacy_keys(values: dict) -> list[str]:
    return [key for key in LEGACY_STAGE_KEYS
            if key.split(".")[1] in (values.get(key.split(".")[0]) or {})]


def _migrate_stages(values: dict) -> dict:
    """A saved config from before `train.stages`: its paired stage fields as the stage list."""
    found = _legacy_keys(values)
    if not found:
        return values
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    stages = [dataclasses.asdict(s) for s in _default_stages()]
    for key in found:
        section, name = key.split(".")
        value = values[section].pop(name)
        target = LEGACY_STAGE_KEYS[key].split("=")[0].split(".")
        stage = stages[int(target[2]) - 1]
        if name == "stage2_pairs_in_batch":
            stage["partners"] = "in_batch" if value else "extra"
        else:
            stage[target[3]] = value
    values["train"]["stages"] = stages
    return values


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

    values: dict[str, Any] = _migrate_stages(dict(base or {}))
    if preset and base is None:
        values = deep_merge(get_preset(preset), {"preset": preset})
    layers = []
    if config_file is not None:
        layers.append((str(config_file), yaml.safe_load(Path(config_file).read_text()) or {}))
    layers += [(text, parse_override(text)) for text in overrides]
    for where, layer in layers:
        _check_user_keys(layer, where)
        values = deep_merge(values, layer)
    if "stages" not in values.get("train", {}):  # the defaults' list, so that overrides can name its items
        values = deep_merge({"train": {"stages": [dataclasses.asdict(s) for s in _default_stages()]}}, values)
    values.pop("git_sha", None)
    config = _from_dict(RunConfig, values)
    for key, value, choices in (("optim.schedule", config.optim.schedule, ("official", "ovseg")),
                                ("optim.no_decay", config.optim.no_decay, ("official", "ovseg")),
                                ("model.decoder", config.model.decoder, ("official", "ovseg")),
                                ("model.mask_form", config.model.mask_form, ("official", "ovseg")),
                                ("train.noise", config.train.noise, ("per_sample", "global"))):
        if value not in choices:
            raise ConfigError(f"config key '{key}' wants one of {', '.join(choices)}, got {value!r}")
    _check_stages(config.train.stages)
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' wants a decay in [0, 1), got {config.train.ema_decay}")
    config.git_sha = git_sha()
    return config


def at_stage(config: RunConfig, number: int, **changes) -> RunConfig:
    """`config` set to train stage `number` (from 1), with `changes` made to that stage, and
    train-level fields given as `train_<name>` (e.g. `train_max_minutes=5`)."""
    stages = list(config.train.stages)
    stage_changes = {k: v for k, v in changes.items() if not k.startswith("train_")}
    train_changes = {k[len("train_"):]: v for k, v in changes.items() if k.startswith("train_")}
    stages[number - 1] = dataclasses.replace(stages[number - 1], **stage_changes)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, stages=stages, stage=number, **train_changes))


def _check_user_keys(layer: dict, where: str) -> None:
    """A key the stage list replaced, or `model.losses` (which each stage sets), is an error
    that names the key to use."""
    for key in _legacy_keys(layer):
        raise ConfigError(f"{where}: '{key}' is now '{LEGACY_STAGE_KEYS[key]}' (each stage is an item of train.stages)")
    if "losses" in (layer.get("model") or {}):
        raise ConfigError(f"{where}: each stage sets its losses: use train.stages.N.losses, not model.losses")


def _check_stages(stages: list[StageConfig]) -> None:
    from ovseg.training.model.ovsegmentor import LOSS_NAMES

    if not stages:
        raise ConfigError("train.stages is empty: a run needs at least one stage")
    for number, stage in enumerate(stages, 1):
        key = f"train.stages.{number}"
        if stage.partners not in STAGE_PARTNERS:
            raise ConfigError(f"config key '{key}.partners' wants one of {', '.join(STAGE_PARTNERS)}, got {stage.partners!r}")
        if stage.augment not in STAGE_AUGMENTS:
            raise ConfigError(f"config key '{key}.augment' wants one of {', '.join(STAGE_AUGMENTS)}, got {stage.augment!r}")
        unknown = sorted(set(stage.losses) - set(LOSS_NAMES))
        if unknown or not stage.losses:
            raise ConfigError(f"config key '{key}.losses' wants some of {', '.join(LOSS_NAMES)}, got {stage.losses!r}")
        unknown = sorted(set(stage.loss_weights or {}) - set(LOSS_NAMES))
        if unknown:
            raise ConfigError(f"config key '{key}.loss_weights' names no loss {', '.join(unknown)}: "
                              f"the losses are {', '.join(LOSS_NAMES)}")
        if "mask" in stage.losses and stage.partners == "none":
            raise ConfigError(f"{key}: the mask loss needs partner images: set {key}.partners to extra or in_batch")
        if not 0 < stage.crop <= 1:
            raise ConfigError(f"config key '{key}.crop' wants a scale in (0, 1], got {stage.crop}")


def write_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
