"""`ovseg train` with a bad outside source (a missing --init, a missing model.vision_init file,
a hub name offline) stops with one line on stderr and exit code 2, never a traceback."""

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app

from .conftest import make_contract


def _train(*args):
    return CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", *args])


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ovseg train: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The machine has no hub access: fail fast instead of retrying for half a minute."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_init_checkpoint_is_a_one_line_error(contract, tmp_path):
    missing = tmp_path / "runs" / "small" / "stage1" / "last.pt"
    result = _train("--data", str(contract), "--run-dir", str(tmp_path / "s2"), "--stage", "2", "--init", str(missing))
    _one_line_error(result, str(missing), "does not exist")
    assert not (tmp_path / "s2").exists()


def test_damaged_init_checkpoint_is_a_one_line_error_naming_it(contract, tmp_path):
    damaged = tmp_path / "last.pt"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    result = _train("--data", str(contract), "--run-dir", str(tmp_path / "s2"), "--stage", "2", "--init", str(damaged))
    _one_line_error(result, str(damaged))


def test_missing_vision_init_file_is_a_one_line_error(contract, tmp_path):
    missing = tmp_path / "dino.pth"
    result = _train("--data", str(contract), "--run-dir", str(tmp_path / "r"), "--stage", "1", "train.stages.1.steps=1",
                    f"model.vision_init={missing}")
    _one_line_error(result, "model.vision_init", "does not exist")


def test_offline_timm_dino_name_is_a_one_line_error(contract, tmp_path):
    result = _train("--data", str(contract), "--run-dir", str(tmp_path / "r"), "--stage", "1", "train.stages.1.steps=1",
                    "model.vision_init=vit_small_patch16_224.dino")
    _one_line_error(result, "vit_small_patch16_224.dino", "local DINO checkpoint")


def test_offline_hub_text_encoder_is_a_one_line_error(contract, tmp_path):
    result = _train("--data", str(contract), "--run-dir", str(tmp_path / "r"), "--stage", "1", "train.stages.1.steps=1",
                    "model.text_pretrained=bert-base-uncased")
    _one_line_error(result, "model.text_pretrained=bert-base-uncased", "local directory")
    assert not (tmp_path / "r").exists()  # checked before the run folder is made


def test_documented_stage_lines_chain(contract, tmp_path):
    """docs/training.md: `--stage 1` into R/stage1, then `--stage 2 --init R/stage1/last.pt`."""
    first, second = tmp_path / "small" / "stage1", tmp_path / "small" / "stage2"
    assert _train("--data", str(contract), "--run-dir", str(first), "--stage", "1", "train.stages.1.steps=1").exit_code == 0
    assert (first / "last.pt").is_file()
    result = _train("--data", str(contract), "--run-dir", str(second), "--stage", "2", "--init", str(first / "last.pt"),
                    "train.stages.2.steps=1")
    assert result.exit_code == 0, result.output
    assert (second / "last.pt").is_file()
