"""The `synthetic-paper` preset: the paper's model (learned grouping with Gumbel straight-through
hard assignment, blocks before and after it, the official decoder and mask loss) at a size a
2-core CPU trains, with ovseg's additions off."""

import json

import pytest
import torch
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.training.config import resolve

from .conftest import make_contract


def test_the_preset_is_the_papers_model_with_ovsegs_additions_off():
    cfg = resolve("synthetic-paper")
    m, t = cfg.model, cfg.train
    assert (m.grouping, m.hard_assignment, m.patch_embed) == ("learned", True, "linear")
    assert m.depth_before > 0 and m.depth_after > 0
    assert (m.decoder, m.mask_form) == ("official", "official") and m.momentum > 0
    assert [s.losses for s in t.stages] == [["contrastive", "entity"], ["contrastive", "entity", "mask"]]
    assert t.ema_decay == 0 and t.stages[1].partners == "extra" and cfg.optim.schedule == "official"
    # each addition is one override away
    on = resolve("synthetic-paper", overrides=["model.patch_embed=cnn", "train.stages.1.losses=[contrastive,entity,grounding]"])
    assert on.model.patch_embed == "cnn" and "grounding" in on.train.stages[0].losses


@pytest.mark.slow  # builds and trains two stages: tens of seconds on a loaded 2-core machine
def test_both_stages_train_through_the_cli(tmp_path):
    data = make_contract(tmp_path / "DATA")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--preset", "synthetic-paper", "--no-progress", "--data", str(data),
                                      "--run", str(run), "train.stages.1.steps=2", "train.stages.2.steps=2",
                                      "train.batch_size=4", "train.stages.2.batch_size=4", "train.device=cpu",
                                      "train.log_every=1"])
    assert result.exit_code == 0, result.output
    records = {stage: [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
               for stage in ("stage1", "stage2")}
    assert [r["step"] for r in records["stage1"]] == [1, 2] and [r["step"] for r in records["stage2"]] == [1, 2]
    assert {"loss/contrastive", "loss/entity"} <= set(records["stage1"][-1])
    assert "loss/mask" in records["stage2"][-1] and "loss/grounding" not in records["stage2"][-1]
    assert all(torch.isfinite(torch.tensor(r["loss/loss"])) for rs in records.values() for r in rs)
    state = torch.load(run / "stage2" / "last.pt", weights_only=True)
    assert state["config"]["preset"] == "synthetic-paper"
    assert any(k.startswith("momentum_encoder.") for k in state["model"])  # the official mask loss's teacher
