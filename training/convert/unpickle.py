"""Read a `torch.save`d file without running code from it.

Official OVSegmentor checkpoints pickle their omegaconf config as an object, so weights-only
loading refuses them. This module is the `pickle_module` given to `torch.load`: its unpickler
resolves only torch's tensor rebuild functions, its dtypes and `collections.OrderedDict` (torch
itself resolves the storage classes); every other global the file names becomes an inert
placeholder class that records what it was called with and never calls anything. A pickle can
only run code through the globals it resolves, so nothing from the file runs; `plain` turns the
placeholders of an omegaconf config back into dicts and lists of values."""

from __future__ import annotations

import collections
import pickle
import re
from pathlib import Path
from typing import Any

import torch

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}


class Opaque:
    """An object of a class the file named and this reader does not trust: it keeps the
    arguments it was built with and the state it was given, and nothing else happens."""

    module = ""
    qualname = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.module}.{self.qualname}>"


_placeholders: dict[tuple[str, str], type] = {}


def placeholder(module: str, name: str) -> type:
    """The inert stand-in class for the global `module.name` (one per name)."""
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(re.sub(r"\W", "_", name) or "anon", (Opaque,), {"module": module, "qualname": name})
    return _placeholders[key]


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return placeholder(module, name)


def load(file, **kwargs):
    """`pickle.load` through the restricted unpickler (torch.load's legacy format calls it)."""
    return Unpickler(file, **kwargs).load()


def read_checkpoint(path: str | Path) -> Any:
    """The object a `torch.save`d file holds, tensors on the CPU, unknown classes as placeholders."""
    import sys

    return torch.load(Path(path), map_location="cpu", weights_only=False, pickle_module=sys.modules[__name__])


def plain(value: Any) -> Any:
    """Placeholders of omegaconf containers and nodes as dicts, lists and their values (other
    placeholders as None); `${a.b}` interpolations that are a whole value are resolved."""
    root = _plain(value)
    return _resolve(root, root)


def _plain(value: Any) -> Any:
    if isinstance(value, Opaque):
        state = value.state if isinstance(value.state, dict) else {}
        if "_content" in state:
            return _plain(state["_content"])
        if "_val" in state:
            return _plain(state["_val"])
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(k, Opaque)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _resolve(value: Any, root: Any, depth: int = 0) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, root, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, depth) for v in value]
    match = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
    if match is None or depth > 8:
        return value
    node = root
    for part in match.group(1).split("."):
        if not isinstance(node, dict) or part not in node:
            return value
        node = node[part]
    return _resolve(node, root, depth + 1)
