"""Checkpoint converters: the restricted reader runs nothing from a file; official OVSegmentor
and GroupViT state dicts (built here from tiny configs with the official key names) convert and
load; a small random transformers GroupViT, converted, gives transformers' own outputs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ovseg.training.convert.unpickle import Opaque, plain, read_checkpoint  # noqa: E402

torch.set_num_threads(1)


# -- reading a file runs nothing from it -------------------------------------------------------

class _Payload:
    """Pickles as a call of os.system: a plain pickle.load would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_reading_a_checkpoint_never_runs_code_from_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "payload": _Payload(f"touch {marker}")}, path)
    # the same file through plain unpickling would run it: the test's payload is live
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    state = read_checkpoint(path)
    assert not marker.exists()
    assert isinstance(state["payload"], Opaque) and state["payload"].args == (f"touch {marker}",)
    assert torch.equal(state["model"]["w"], torch.ones(2))


def _fake_omegaconf():
    """Classes that pickle as omegaconf's do (module omegaconf.dictconfig, state with _content,
    nodes with _val), registered only while the file is written: the reader has no omegaconf."""
    dictconfig = types.ModuleType("omegaconf.dictconfig")
    nodes = types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content):
            self.__dict__.update(_metadata=object.__new__(AnyNode), _parent=None, _content=content)

    class AnyNode:
        def __init__(self, value):
            self.__dict__.update(_val=value, _metadata=None, _parent=None)

    DictConfig.__module__, AnyNode.__module__ = dictconfig.__name__, nodes.__name__
    DictConfig.__qualname__, AnyNode.__qualname__ = "DictConfig", "AnyNode"
    dictconfig.DictConfig, nodes.AnyNode = DictConfig, AnyNode
    package = types.ModuleType("omegaconf")
    package.dictconfig, package.nodes = dictconfig, nodes
    return {"omegaconf": package, dictconfig.__name__: dictconfig, nodes.__name__: nodes}, DictConfig, AnyNode


def test_an_omegaconf_config_is_read_as_plain_values(tmp_path, monkeypatch):
    modules, DictConfig, AnyNode = _fake_omegaconf()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    config = DictConfig({"model": DictConfig({"use_entityloss": AnyNode(True), "img_encoder": DictConfig(
        {"num_heads": [AnyNode(8), AnyNode(8)], "embed_dim": AnyNode(768)})}),
        "data": DictConfig({"use_entity": AnyNode("${model.use_entityloss}")})})
    torch.save({"model": {}, "config": config}, tmp_path / "ckpt.pth")
    for name in modules:
        monkeypatch.delitem(sys.modules, name)
    values = plain(read_checkpoint(tmp_path / "ckpt.pth")["config"])
    assert values == {"model": {"use_entityloss": True, "img_encoder": {"num_heads": [8, 8], "embed_dim": 768}},
                      "data": {"use_entity": True}}
