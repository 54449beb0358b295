"""The run config: defaults < preset < YAML file < key.sub=value overrides, typed and written back."""

import pytest
import yaml

from ovseg.training.config import ConfigError, parse_override, resolve, to_dict, write_config


def test_override_parses_dotted_keys_and_yaml_values():
    assert parse_override("train.steps=100") == {"train": {"steps": 100}}
    assert parse_override("optim.betas=[0.9, 0.95]") == {"optim": {"betas": [0.9, 0.95]}}
    assert parse_override("data.randaugment=null") == {"data": {"randaugment": None}}
    with pytest.raises(ConfigError):
        parse_override("train.steps")


def test_precedence_is_preset_then_file_then_overrides(tmp_path):
    base = resolve("test")
    assert base.train.batch_size == 4 and base.model.width == 32  # from the preset
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  batch_size: 6\n  steps: 9\n")
    cfg = resolve("test", extra, ["train.steps=11", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.batch_size == 6 and cfg.train.steps == 11
    assert cfg.optim.betas == (0.9, 0.95)  # lists become the declared tuple
    assert cfg.model.width == 32 and cfg.preset == "test"


def test_unknown_key_is_refused_with_its_path():
    with pytest.raises(ConfigError, match="train.stepz"):
        resolve("test", overrides=["train.stepz=1"])


def test_values_take_their_field_types(tmp_path):
    """YAML 1.1 reads 3e-3 as a string; the config must still hold the number."""
    cfg = resolve("test", overrides=["optim.lr=3e-3", "train.steps=1e3", "model.loss_weights.grounding=2",
                                     "optim.betas=[0.9, 1]", "data.randaugment=null"])
    assert cfg.optim.lr == 0.003 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.model.loss_weights["grounding"] == 2.0 and cfg.optim.betas == (0.9, 1.0)
    assert cfg.data.randaugment is None
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  lr: 5e-4\n")
    assert resolve("test", extra).optim.lr == 0.0005


@pytest.mark.parametrize("override, key", [("train.steps=abc", "train.steps"), ("train.steps=2.5", "train.steps"),
                                           ("optim.lr=fast", "optim.lr"), ("train.compile=maybe", "train.compile"),
                                           ("optim.betas=[0.9]", "optim.betas"), ("model.cnn_channels=[32, x]", "model.cnn_channels[1]")])
def test_a_value_of_the_wrong_type_is_refused_with_its_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        resolve("test", overrides=[override])


def test_resolved_config_round_trips_through_yaml_with_the_git_sha(tmp_path):
    cfg = resolve("test", overrides=["model.num_groups=3"])
    write_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == to_dict(cfg) and saved["model"]["num_groups"] == 3
    assert "git_sha" in saved
    again = resolve(base=saved)  # what a resume does
    assert to_dict(again) == {**saved, "git_sha": again.git_sha}


@pytest.mark.parametrize("key", ["optim.schedule", "optim.no_decay", "model.decoder", "model.mask_form"])
def test_a_form_that_does_not_exist_is_refused_with_its_key_and_the_choices(key):
    with pytest.raises(ConfigError, match=rf"{key}.*official, ovseg"):
        resolve("test", overrides=[f"{key}=paper"])
