"""What every converter shares: reading a source file safely, loading the tokenizer OUT will
carry, and writing OUT as a checkpoint `load_model`, `eval`, `segment` and `--init` take."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class ConvertError(ValueError):
    """A source that cannot be converted (unreadable, not the expected format, unknown layout)."""


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict (a file's `model` entry, or the file itself when it is a bare state dict;
    any `module.` prefix dropped) and the file's config values (plain, {} without one)."""
    from ovseg.training.convert.unpickle import plain, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist or is not a file")
    try:
        obj = read_checkpoint(path)
    except Exception as error:  # truncated, not a torch file, legacy format ...
        raise ConvertError(f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    config: dict[str, Any] = {}
    weights = obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        weights = obj["model"]
        values = plain(obj.get("config"))
        config = values if isinstance(values, dict) else {}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        weights = obj["state_dict"]
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConvertError(f"{path} holds no state dict (a dict of tensors, alone or under 'model')")
    return {k.removeprefix("module."): v for k, v in weights.items()}, config


def load_tokenizer(name_or_dir: str):
    """A fast transformers tokenizer from a hub name or a local folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_dir, use_fast=True)
    except Exception as error:  # no network, no such folder
        raise ConvertError(f"could not load the tokenizer {name_or_dir!r} ({type(error).__name__}); "
                           "pass --tokenizer a local transformers tokenizer folder") from error


def write_checkpoint(out: str | Path, model_values: dict[str, Any], weights: dict[str, torch.Tensor], tokenizer,
                     source: dict[str, Any]) -> dict[str, Any]:
    """Build the ovseg model `model_values` describe (over the `paper` preset's model), put the
    converted `weights` into it and write OUT (temp name, then rename). Every converted tensor
    must land on a parameter or buffer of the same shape; the model's tensors the source has no
    counterpart for keep their initial values and are listed in the summary returned."""
    from ovseg.training.checkpoint import tokenizer_state
    from ovseg.training.config import RunConfig, _from_dict, to_dict
    from ovseg.training.model import build_model
    from ovseg.training.presets import get_preset

    values = dict(get_preset("paper").get("model", {}), vision_init=None, text_pretrained=None)
    values.update(model_values)
    config = _from_dict(RunConfig, {"model": values, "preset": "paper"})
    model = build_model(config.model, tokenizer=tokenizer)
    own = model.state_dict()
    for key, value in weights.items():
        if key not in own:
            raise ConvertError(f"converted tensor {key} has no place in the ovseg model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ConvertError(f"converted tensor {key} has shape {tuple(value.shape)}, "
                               f"the model {tuple(own[key].shape)}")
    state = {k: weights[k].to(v.dtype).clone() if k in weights else v for k, v in own.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    summary = {**source, "converted": len(weights), "left_at_init": sorted(k for k in own if k not in weights)}
    torch.save({"model": state, "config": to_dict(config), **tokenizer_state(tokenizer), "converted_from": summary,
                "step": 0}, tmp)
    os.replace(tmp, out)
    return summary
