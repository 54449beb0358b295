"""A stage's global batch split over processes and micro-batches, and the micro-batch chosen by
a memory probe."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.training.batching import BatchError, plan_batch

from .conftest import make_contract


def test_the_probe_finds_the_largest_divisor_that_fits_with_few_tries():
    tried = []

    def fits(size):  # memory for 96 samples
        tried.append(size)
        return size <= 96

    plan = plan_batch(2048, 8, fits=fits)  # 256 per process
    assert (plan.micro_batch, plan.accum_steps, plan.processes) == (64, 4, 8)  # 128 does not fit; 64 divides 256
    assert plan.micro_batch * plan.accum_steps * plan.processes == 2048
    assert len(tried) <= 4 and "128 did not" in plan.describe()
    assert plan_batch(1024, 8, fits=lambda size: True).accum_steps == 1  # all of it fits: one micro-batch


def test_a_micro_batch_set_by_hand_is_taken_and_no_probe_runs():
    plan = plan_batch(2048, 2, micro_batch=128, fits=lambda size: pytest.fail("probed"))
    assert (plan.micro_batch, plan.accum_steps) == (128, 8) and "optim.micro_batch" in plan.how
    assert plan_batch(64, 1).micro_batch == 64  # no probe (a CPU): the per-process batch


@pytest.mark.parametrize("args, message", [((2048, 3), "multiple of 3"), ((2048, 8, 100), "does not divide"),
                                           ((0, 1), "does not split")])
def test_a_split_that_cannot_be_made_says_why(args, message):
    with pytest.raises(BatchError, match=message):
        plan_batch(*args)
    with pytest.raises(BatchError, match="not even a micro-batch of 1"):
        plan_batch(16, 1, fits=lambda size: False)


@pytest.mark.slow  # trains two steps through the CLI
def test_a_global_batch_trains_in_micro_batches_and_says_what_it_chose(tmp_path):
    data = make_contract(tmp_path / "DATA")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", "--data", str(data), "--run", str(run),
                                      "--stage", "1", "train.stages.1.steps=2", "train.stages.1.global_batch=8",
                                      "optim.micro_batch=2", "train.device=cpu"])
    assert result.exit_code == 0, result.output
    assert "global batch 8 = 1 processes x 4 micro-batches x 2 (set by optim.micro_batch)" in result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["accum_steps"] == 4 and saved["train"]["stages"][0]["batch_size"] == 2
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    bad = CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", "--data", str(data),
                                   "--run", str(tmp_path / "bad"), "--stage", "1", "train.stages.1.global_batch=8",
                                   "optim.micro_batch=3", "train.device=cpu"])
    assert bad.exit_code == 1 and "optim.micro_batch 3 does not divide" in bad.output
