"""Checkpoints: one `torch.save`d dict of plain containers and tensors, written atomically and
loaded with `weights_only=True` (docs/architecture.md lists the keys)."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

CKPT_PATTERN = re.compile(r"step-(\d+)\.pt$")
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, damaged, not a checkpoint, or refused by
    the weights-only loader); the message names the file."""


def save(state: dict[str, Any], run_dir: Path, step: int, keep_last: int = 2) -> Path:
    """Write `ckpt/step-N.pt` (temp name, fsync, rename), point `last.pt` at it, drop old ones."""
    ckpt_dir = Path(run_dir) / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    last = Path(run_dir) / "last.pt"
    link_tmp = Path(run_dir) / ".last.pt.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(os.path.relpath(path, Path(run_dir)))
    link_tmp.replace(last)
    for old in sorted(ckpt_dir.glob("step-*.pt"))[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def intact(path: Path) -> bool:
    """True when `path` is a whole torch zip archive (every member's CRC checks; no unpickling)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def latest(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run folder, or None.

    A newer one that is damaged (a disk filled up, a copy cut short) is passed over with a
    warning naming it, so a resume continues from the one before."""
    ckpts = sorted((Path(run_dir) / "ckpt").glob("step-*.pt"))
    for path in reversed(ckpts):
        if intact(path):
            return path
        log.warning("checkpoint %s is damaged (truncated or not a torch archive); passing over it", path)
    return None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's state (weights only: no code in the file runs).

    Raises CheckpointError naming the file when it is damaged or not a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001  (damaged bytes fail in many ways inside torch.load)
        where = f"{path} (-> {path.resolve()})" if path.is_symlink() else str(path)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {where}: damaged, truncated or not an ovseg "
                              f"checkpoint ({first[:200]})") from None


def model_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's model is used with: the moving average of the weights when
    the run kept one (`train.ema_decay`), else the trained weights themselves."""
    return state.get("ema") or state["model"]


def tokenizer_state(tokenizer) -> dict[str, Any]:
    """What a checkpoint keeps of a (fast) tokenizer: its JSON and its special tokens, so that
    `tokenizer_from_state` rebuilds it with no file or network (None entries without one)."""
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        return {"tokenizer": None, "tokenizer_special_tokens": None}
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return {"tokenizer": tokenizer.backend_tokenizer.to_str(), "tokenizer_special_tokens": special}


def tokenizer_from_state(state: dict[str, Any]):
    """The tokenizer a checkpoint carries, or None. Training checkpoints of a tokenizer learnt on
    the captions carry its JSON alone (BERT-style special tokens); others also name theirs."""
    from ovseg.training.tokenizer import tokenizer_from_json

    text = state.get("tokenizer")
    if not text:
        return None
    special = state.get("tokenizer_special_tokens")
    if not special:
        return tokenizer_from_json(text)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **special)


def offline_model_config(model_cfg, weights: dict[str, torch.Tensor]):
    """The model config to rebuild a checkpoint's model with: the architecture without its
    initialisations (`vision_init`, `text_pretrained`), since the weights come from the
    checkpoint. The text encoder is built from the recorded `text_config`, or for checkpoints
    written before it was recorded, from the shapes of its weights."""
    from dataclasses import replace

    from ovseg.training.model.text_encoder import text_config_from_weights

    text_config = model_cfg.text_config
    if text_config is None and model_cfg.text_pretrained:
        prefix = "text_encoder.bert." if model_cfg.text_arch == "bert" else "text_encoder.clip."
        text_config = text_config_from_weights(weights, prefix, model_cfg.text_arch)
    return replace(model_cfg, vision_init=None, text_pretrained=None, text_config=text_config)


def config_from_state(state: dict[str, Any]):
    """The `RunConfig` a checkpoint was trained with."""
    from ovseg.training.config import RunConfig, _from_dict

    return _from_dict(RunConfig, {k: v for k, v in state["config"].items() if k != "git_sha"})


def model_from_state(state: dict[str, Any], map_location: str | torch.device = "cpu"):
    """Build the model the checkpoint describes and load its weights (strict; the moving
    average when the run kept one, see `model_weights`). Nothing is downloaded or read but the
    checkpoint, except the tokenizer of an old checkpoint that did not keep its own."""
    from ovseg.training.model import build_model
    from ovseg.training.model.text_encoder import load_text_tokenizer

    config = config_from_state(state)
    weights = model_weights(state)
    tokenizer = tokenizer_from_state(state)
    if tokenizer is None and config.model.text_pretrained:
        tokenizer = load_text_tokenizer(config.model)
    model = build_model(offline_model_config(config.model, weights), tokenizer=tokenizer)
    model.load_state_dict(weights)
    return model.to(map_location)


def load_model(path: Path, map_location: str | torch.device = "cpu"):
    """An OVSegmentor in eval mode from a training checkpoint or a converted one (`ovseg
    convert`), for evaluation and `segment`."""
    state = load(path, map_location="cpu")
    return model_from_state(state, map_location).eval()
