"""The run config: defaults < preset < YAML file < key.sub=value overrides, typed and written back."""

import pytest
import yaml

from ovseg.training.config import ConfigError, parse_override, resolve, to_dict, write_config


def test_override_parses_dotted_keys_and_yaml_values():
    assert parse_override("train.stages.1.steps=100") == {"train": {"stages": {"1": {"steps": 100}}}}
    assert parse_override("optim.betas=[0.9, 0.95]") == {"optim": {"betas": [0.9, 0.95]}}
    assert parse_override("data.randaugment=null") == {"data": {"randaugment": None}}
    with pytest.raises(ConfigError):
        parse_override("train.steps")


def test_precedence_is_preset_then_file_then_overrides(tmp_path):
    base = resolve("test")
    assert base.train.batch_size == 4 and base.model.width == 32  # from the preset
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  batch_size: 6\n  stages: {1: {steps: 9}, 2: {steps: 7}}\n")
    cfg = resolve("test", extra, ["train.stages.1.steps=11", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.batch_size == 6 and cfg.train.stages[0].steps == 11 and cfg.train.stages[1].steps == 7
    assert cfg.optim.betas == (0.9, 0.95)  # lists become the declared tuple
    assert cfg.model.width == 32 and cfg.preset == "test"


def test_unknown_key_is_refused_with_its_path():
    with pytest.raises(ConfigError, match="train.stepz"):
        resolve("test", overrides=["train.stepz=1"])


def test_values_take_their_field_types(tmp_path):
    """YAML 1.1 reads 3e-3 as a string; the config must still hold the number."""
    cfg = resolve("test", overrides=["optim.lr=3e-3", "train.stages.1.steps=1e3", "model.loss_weights.grounding=2",
                                     "optim.betas=[0.9, 1]", "data.randaugment=null"])
    assert cfg.optim.lr == 0.003 and isinstance(cfg.optim.lr, float)
    assert cfg.train.stages[0].steps == 1000 and isinstance(cfg.train.stages[0].steps, int)
    assert cfg.model.loss_weights["grounding"] == 2.0 and cfg.optim.betas == (0.9, 1.0)
    assert cfg.data.randaugment is None
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  lr: 5e-4\n")
    assert resolve("test", extra).optim.lr == 0.0005


@pytest.mark.parametrize("override, key", [("train.stages.1.steps=abc", "train.stages[0].steps"),
                                           ("train.stages.2.steps=2.5", "train.stages[1].steps"),
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


def test_each_stage_is_an_item_of_the_stage_list_named_by_its_number():
    cfg = resolve("test", overrides=["train.stages.2.losses=[contrastive,mask]", "train.stages.2.crop=0.9"])
    first, second = cfg.train.stages
    assert first.losses == ["contrastive", "entity", "grounding"] and first.crop == 0.5  # untouched
    assert second.losses == ["contrastive", "mask"] and second.crop == 0.9 and second.partners == "extra"
    three = resolve("test", overrides=["train.stages.3.losses=[contrastive]", "train.stages.3.steps=5"])
    assert len(three.train.stages) == 3 and three.train.stages[2].steps == 5
    assert three.train.stages[2].partners == "none"  # an appended stage starts from the field defaults
    with pytest.raises(ConfigError, match="train.stages has 2 items"):
        resolve("test", overrides=["train.stages.4.steps=1"])
    with pytest.raises(ConfigError, match="train.stages has 2 items"):
        resolve("test", overrides=["train.stages.0.steps=1"])


@pytest.mark.parametrize("override, hint", [("train.stage2_steps=3", "train.stages.2.steps"),
                                            ("optim.stage2_lr=1e-4", "train.stages.2.lr"),
                                            ("data.crop_scale_min=0.3", "train.stages.1.crop"),
                                            ("model.losses=[contrastive]", "train.stages.N.losses")])
def test_a_key_the_stage_list_replaced_is_refused_with_the_key_to_use(override, hint):
    with pytest.raises(ConfigError, match=hint.replace(".", r"\.")):
        resolve("test", overrides=[override])


@pytest.mark.parametrize("override, key", [("train.stages.2.partners=both", "partners"),
                                           ("train.stages.1.augment=heavy", "augment"),
                                           ("train.stages.1.losses=[contrastive,colour]", "losses"),
                                           ("train.stages.1.losses=[contrastive,mask]", "partners"),
                                           ("train.stages.2.crop=0", "crop"),
                                           ("train.stages.1.loss_weights={colour: 1.0}", "loss_weights")])
def test_a_stage_no_run_can_train_is_refused_with_its_key(override, key):
    with pytest.raises(ConfigError, match=key):
        resolve("test", overrides=[override])


def test_a_saved_config_from_before_the_stage_list_still_resumes():
    """Run folders and checkpoints written before `train.stages` hold the paired fields."""
    old = to_dict(resolve("test"))
    del old["train"]["stages"]
    old["train"].update({"stage1_losses": ["contrastive"], "stage2_losses": ["contrastive", "mask"], "steps": 7,
                         "stage2_steps": 3, "stage2_pairs_in_batch": True, "stage2_lr_factor": 2.0})
    old["optim"]["stage2_warmup_steps"] = 0
    old["data"].update({"crop_scale_min": 0.5, "stage2_crop_scale_min": 0.7})
    first, second = resolve(base=old).train.stages
    assert (first.losses, first.steps, first.crop) == (["contrastive"], 7, 0.5)
    assert (second.losses, second.steps, second.crop, second.partners) == (["contrastive", "mask"], 3, 0.7, "in_batch")
    assert (second.lr_factor, second.warmup_steps, second.freeze_text, second.augment) == (2.0, 0, True, "crop_flip")
