"""Presets by name: YAML files in training/presets/ with `model:`, `data:`, `optim:` and
`train:` sections (see the dataclasses in ovseg.training.config)."""

from __future__ import annotations

from importlib.resources import files

import yaml


def _folder():
    return files("ovseg.training").joinpath("presets")


def list_presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _folder().iterdir() if p.name.endswith(".yaml"))


def get_preset(name: str) -> dict:
    path = _folder().joinpath(f"{name}.yaml")
    if not path.is_file():
        from ovseg.training.config import ConfigError

        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return yaml.safe_load(path.read_text()) or {}
