"""`ovseg bench heldout`: a checkpoint's training losses on its training images and on unseen ones."""

import dataclasses
import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ovseg.benchmarks.heldout import HELDOUT_SEED_OFFSET, heldout_world_config, measure, report, stage_losses  # noqa: E402
from ovseg.benchmarks.results import render_section  # noqa: E402
from ovseg.cli.main import app  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A stage-1 checkpoint of the test preset (untrained) and the DATA folder it names."""
    from ovseg.training.config import resolve, to_dict
    from ovseg.training.model import build_model
    from ovseg.training.tokenizer import tokenizer_to_json, train_wordpiece
    from tests.training.conftest import make_contract

    root = tmp_path_factory.mktemp("heldout")
    data = make_contract(root / "DATA", n=16)
    cfg = resolve("test", overrides=[f"data.data_dir={data}", "train.stages.1.batch_size=4",
                                     "train.stages.1.losses=[contrastive,entity]"])
    model_cfg = dataclasses.replace(cfg.model, losses=["contrastive", "entity"])
    tokenizer = train_wordpiece(["a photo of a red circle on a striped background"] * 3, vocab_size=200)
    torch.manual_seed(0)
    model = build_model(model_cfg, tokenizer)
    path = root / "last.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "tokenizer": tokenizer_to_json(tokenizer)}, path)
    return path, data


def test_the_same_images_give_the_same_losses_so_a_gap_is_the_images(checkpoint):
    path, data = checkpoint
    first = stage_losses(path, data, batches=2)
    again = stage_losses(path, data, batches=2)
    assert first == again  # the draw of the batches and the model's noise are fixed by the seed
    assert first["batch_size"] == 4 and first["stage"] == 1
    assert set(first) == {"contrastive", "entity", "loss", "batch_size", "stage"}
    assert all(math.isfinite(first[k]) and first[k] > 0 for k in ("contrastive", "entity"))
    assert stage_losses(path, data, batches=2, seed=1) != first  # another draw of batches and noise


def test_the_section_gives_each_loss_on_both_kinds_of_images_and_the_gap(checkpoint):
    path, data = checkpoint
    rows = measure({"tiny": path}, data, data, batches=1, echo=lambda _: None)
    text = render_section(report(rows, n_heldout=16, batches=1, tag="study"))
    assert "| tiny | 1 | 4 | contrastive |" in text and "| +0.000 |" in text
    assert "log(batch): 1.39 at batch 4." in text
    assert report(rows, 16, 1, tag="study").section == "heldout-study"


def test_the_unseen_world_is_the_training_world_drawn_again_with_another_seed():
    prepared = {"world": {"n_train": 6000, "n_val": 100, "n_test": 300, "image_size": 64, "seed": 3,
                          "shapes": ["circle", "star"], "style": "textured", "max_distractors": 2}}
    cfg = heldout_world_config(prepared, 512)
    assert (cfg.n_train, cfg.seed, cfg.style, cfg.shapes, cfg.max_distractors) == \
        (512, 3 + HELDOUT_SEED_OFFSET, "textured", ("circle", "star"), 2)


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp, ckpt: [str(tmp / "missing.pt"), "--out", str(tmp)], "is not a file"),
    (lambda tmp, ckpt: [str(ckpt), "--out", str(tmp / "nothing")], "holds no prepared world"),
    (lambda tmp, ckpt: [str(ckpt), "--out", str(tmp), "--tag", "a b"], "letters, digits and dashes"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, checkpoint, make_args, message):
    result = CliRunner().invoke(app, ["bench", "heldout", *make_args(tmp_path, checkpoint[0])], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "heldout").exists()

