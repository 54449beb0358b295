"""`ovseg bench grouping-dynamics` records the learned grouping's curves over a few real steps."""

import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ovseg.benchmarks.grouping_dynamics import (  # noqa: E402
    RUNS, DynamicsConfig, _config, benchmark_grouping_dynamics, blank, cached_run, named_config, param_set)
from ovseg.benchmarks.results import render_section  # noqa: E402
from ovseg.cli.main import app  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ovseg.curation.synthetic import WorldConfig, generate
    from tests.training.conftest import make_contract

    root = tmp_path_factory.mktemp("dynamics")
    data = make_contract(root / "DATA", n=16)
    voc = generate(root / "world", WorldConfig(n_train=0, n_val=3, n_test=0, image_size=32)) / "voc"
    return root, data, voc


def test_a_few_steps_of_the_test_preset_record_plausible_curves(world):
    root, data, voc = world
    cfg = DynamicsConfig(preset="test", steps=3, eval_every=2, n_val=3, overrides=("train.stages.1.losses=[contrastive,entity]",))
    result = cached_run(root / "out", data, voc, cfg)
    k = result["num_groups"]
    assert k == 4 and result["steps"] == 3 and result["n_val"] == 3 and result["minutes"] > 0
    assert [p["step"] for p in result["curve"]] == [0, 2, 3]  # the init, every 2 steps, and the end
    for point in result["curve"]:
        assert 0.0 <= point["entropy"] <= math.log(k) + 1e-6
        assert 1.0 <= point["groups_per_image"] <= k
        assert 1.0 / k - 1e-6 <= point["largest_group_share"] <= 1.0
        assert 0.0 <= point["group_constant_share"] <= 1.0
        assert 0.0 <= point["group_majority_miou"] <= 100.0
    for point in result["curve"][1:]:  # the gradient reached the assignment logits and every parameter set
        assert 0.0 < point["logit_grad"] < math.inf
        assert all(0.0 < point[f"relgrad/{name}"] < math.inf
                   for name in ("assign q/k", "group tokens", "grouping block (rest)", "image encoder (rest)",
                                "text and heads"))
    # the hooks are gone: the assigner's logits are its class's method again
    again = cached_run(root / "out", data, voc, cfg)
    assert again == result  # the same config is read back, not trained again


def test_remedy_knobs_act_on_the_run_and_are_recorded(world):
    root, data, voc = world
    cfg = named_config("soft-early", preset="test", steps=2, eval_every=2, n_val=2)
    assert cfg.soft_fraction == 0.5
    cfg = DynamicsConfig(name="gain", preset="test", steps=2, eval_every=2, n_val=2, logit_gain=50.0,
                         group_token_std=1.0, tau_end=0.5)
    result = cached_run(root / "out", data, voc, cfg)
    assert result["curve"][-1]["tau"] == pytest.approx(0.5)  # annealed to tau_end by the last step
    # a large gain makes each patch's assignment far more certain than at the preset's scale
    plain = cached_run(root / "out", data, voc, DynamicsConfig(name="plain", preset="test", steps=2, eval_every=2, n_val=2))
    assert result["curve"][0]["entropy"] < plain["curve"][0]["entropy"]
    section = benchmark_grouping_dynamics(root / "out", data, voc, [cfg], threads=1)
    text = render_section(section)
    assert "assignment logits x 50" in text and "group tokens drawn at std 1" in text and "| gain | " in text
    assert section.section == "grouping-dynamics-2"
    # a tagged study at the same budget gets a section of its own (the runs are read back)
    assert benchmark_grouping_dynamics(root / "out", data, voc, [cfg], threads=1, tag="naming").section == \
        "grouping-dynamics-2-naming"


def test_the_text_only_run_trains_on_flat_images_and_older_runs_still_match(world):
    import json

    import torch

    batch = {"image": torch.randn(2, 3, 4, 4), "partner_image": torch.randn(2, 3, 4, 4),
             "input_ids": torch.tensor([[5, 6], [7, 8]])}
    (flat,) = blank([{k: v.clone() for k, v in batch.items()}])
    assert not flat["image"].any() and not flat["partner_image"].any()  # the mean colour, once normalised
    assert torch.equal(flat["input_ids"], batch["input_ids"])  # the captions are left as they are

    root, data, voc = world
    cfg = named_config("cnn-text-dropout-0-center-grounding-text-only", preset="test", steps=2, eval_every=2, n_val=2,
                       overrides=("train.stages.1.losses=[contrastive,entity]",))
    assert cfg.blank_images
    result = cached_run(root / "text-only", data, voc, cfg)
    assert result["blank_images"] and result["steps"] == 2
    assert "flat images (the captions alone)" in render_section(
        benchmark_grouping_dynamics(root / "text-only", data, voc, [cfg], threads=1))
    # a run at the default stores no blank_images field, as runs stored before it existed did
    plain = DynamicsConfig(name="plain", preset="test", steps=2, eval_every=2, n_val=2)
    cached_run(root / "text-only", data, voc, plain)
    (stored,) = (root / "text-only" / "runs").glob("plain-seed0-*.json")
    assert "blank_images" not in json.loads(stored.read_text())["config"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_named_run_resolves_on_the_paper_preset_with_its_settings(tmp_path, name):
    import yaml

    from ovseg.training.config import to_dict

    cfg = named_config(name, steps=10, batch_size=8)
    resolved = to_dict(_config(cfg, tmp_path))
    assert resolved["train"]["stages"][0]["steps"] == 10 and resolved["train"]["stages"][0]["batch_size"] == 8
    for override in cfg.overrides:
        key, raw = override.split("=", 1)
        node = resolved
        for part in key.split("."):  # stages are numbered from 1
            node = node[int(part) - 1] if isinstance(node, list) else node[part]
        expected = yaml.safe_load(raw)  # YAML reads 3e-3 as a string; the config types it
        assert node == (float(expected) if isinstance(node, float) else expected), override


def test_parameters_fall_into_the_named_sets():
    assert param_set("image_encoder.grouping.assign.k_proj.weight") == "assign q/k"
    assert param_set("image_encoder.group_token") == "group tokens"
    assert param_set("image_encoder.grouping.mlp_inter.fc1.weight") == "grouping block (rest)"
    assert param_set("image_encoder.blocks.0.attn.qkv.weight") == "image encoder (rest)"
    assert param_set("text_encoder.embeddings.word_embeddings.weight") == "text and heads"


@pytest.mark.parametrize("args, message", [
    (["--runs", "nope"], "unknown runs"),
    (["--style", "wavy"], "standard or textured"),
    (["--seeds", "0,x"], "take integers"),
    (["--runs", "baseline@x"], "take integers"),
    (["--preset", "synthetic-small"], "learned grouping"),
    (["--tag", "bad tag"], "letters, digits and dashes"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "grouping-dynamics", "--out", str(tmp_path / "o"), *args])
    said = " ".join(result.output.replace("│", " ").split())  # the error box wraps long lines
    assert result.exit_code == 2 and message in said
    assert not (tmp_path / "o").exists()
