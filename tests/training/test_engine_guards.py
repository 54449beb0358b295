"""Training refuses settings no run can use, flags a short run that could not read its images,
and shows the budget of a run bounded by time (issue 26 items 11, 13, 15)."""

import json

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.training.config import DataConfig
from ovseg.training.engine import SKIP_EVIDENCE, _progress_bar, _too_many_skipped

from .conftest import make_contract


def _cli(*args):
    return CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", *args])


@pytest.mark.parametrize("override, message", [
    ("train.stages.1.steps=-5", "train.stages.1.steps must be at least 1"),
    ("optim.lr=-1", "optim.lr must be a finite number above 0"),
    ("optim.lr=nan", "optim.lr must be a finite number above 0"),
])
def test_impossible_settings_are_one_line_errors_before_anything_is_saved(tmp_path, override, message):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "--stage", "1", override)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (run / "ckpt").exists()


@pytest.mark.slow
def test_a_short_run_with_half_its_images_unreadable_fails_at_its_end(tmp_path):
    data = make_contract(tmp_path / "D", n=12, corrupt=tuple(range(0, 12, 2)))
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=2")
    assert result.exit_code == 1 and "could not be read" in result.output
    assert "last checkpoint" in result.output and (run / "last.pt").exists()  # the work is kept


def test_the_skip_rate_needs_only_a_few_unreadable_samples_as_evidence():
    cfg = DataConfig()  # max_skip_rate 0.05, min_samples_for_skip_check 200
    assert not _too_many_skipped(10, 5, cfg)                     # 5 unreadable: too few to say yet
    assert _too_many_skipped(2 * SKIP_EVIDENCE, SKIP_EVIDENCE, cfg)  # half of 40: enough
    assert not _too_many_skipped(1000, 40, cfg)                  # 4% is within the limit
    assert _too_many_skipped(cfg.min_samples_for_skip_check, 11, cfg)


def test_a_time_bounded_run_shows_its_time_budget_not_its_steps():
    bar = _progress_bar(10, 100_000, 0, 1, enabled=True)
    assert bar.total == 600 and bar.unit == "s"
    bar.close()
    steps = _progress_bar(None, 100, 5, 1, enabled=True)
    steps.close()
    assert steps.total == 100 and steps.n == 5


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    first = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=4", "train.ckpt_every=2")
    assert first.exit_code == 0, first.output
    newest = run / "ckpt" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk that filled up
    again = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=6", "train.ckpt_every=2")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output[again.output.index("{"):])
    assert summary["step"] == 6
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6  # the metrics after step 2 were logged again, once
