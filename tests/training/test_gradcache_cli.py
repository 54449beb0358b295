"""Through `ovseg train`: k cached micro-batches of b train as one batch of k x b, and plain
accumulation does not."""

import json

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app

from .conftest import make_contract


def _losses(data, run, *overrides) -> list[dict]:
    result = CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", "--data", str(data),
                                      "--run", str(run), "--stage", "1", "train.stages.1.steps=2",
                                      "train.log_every=1", "train.device=cpu", *overrides])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three short training runs through the CLI
def test_cached_micro_batches_log_the_losses_of_one_large_batch(tmp_path):
    data = make_contract(tmp_path / "DATA", n=24)
    whole = _losses(data, tmp_path / "whole", "train.batch_size=8")
    cached = _losses(data, tmp_path / "cached", "train.batch_size=2", "optim.accum_steps=4",
                     "optim.contrastive_cache=true")
    plain = _losses(data, tmp_path / "plain", "train.batch_size=2", "optim.accum_steps=4")
    assert [r["step"] for r in whole] == [r["step"] for r in cached] == [1, 2]
    for big, small in zip(whole, cached):  # step 1: the same forward; step 2: after the same update
        for key in ("loss/contrastive", "loss/loss"):
            assert small[key] == pytest.approx(big[key], rel=1e-4, abs=1e-5), (key, big["step"])
    # plain accumulation averages four batches of 2: each contrastive loss sees one negative
    assert abs(plain[0]["loss/contrastive"] - whole[0]["loss/contrastive"]) > 0.1


def test_caching_with_the_global_random_stream_is_refused(tmp_path):
    data = make_contract(tmp_path / "DATA")
    result = CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", "--data", str(data),
                                      "--run", str(tmp_path / "r"), "--stage", "1", "optim.contrastive_cache=true",
                                      "train.noise=global", "train.device=cpu"])
    assert result.exit_code == 1 and "train.noise=per_sample" in result.output
