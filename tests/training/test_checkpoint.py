"""Checkpoints: atomic writes, last.pt follows the newest, only the last N kept, weights-only load."""

import torch

from ovseg.training import checkpoint as ckpt


def _state(step):
    return {"model": {"w": torch.full((2,), float(step))}, "step": step, "config": {"a": [1, 2]},
            "rng": {"cpu": torch.get_rng_state()}}


def test_save_keeps_the_last_n_and_last_points_at_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.save(_state(step), tmp_path, step, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-00000006.pt", "step-00000008.pt"]  # no temporary files left
    assert ckpt.latest(tmp_path).name == "step-00000008.pt"
    state = ckpt.load(tmp_path / "last.pt")
    assert state["step"] == 8 and torch.equal(state["model"]["w"], torch.full((2,), 8.0))


def test_a_partial_write_is_never_taken_for_a_checkpoint(tmp_path):
    ckpt.save(_state(2), tmp_path, 2)
    (tmp_path / "ckpt" / "step-00000004.pt.tmp").write_bytes(b"half a file")  # killed mid-write
    assert ckpt.latest(tmp_path).name == "step-00000002.pt"


def test_latest_of_an_empty_run_is_none(tmp_path):
    assert ckpt.latest(tmp_path) is None


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_latest_checkpoint_is_passed_over_with_a_warning(tmp_path, caplog):
    for step in (2, 4):
        ckpt.save(_state(step), tmp_path, step)
    _truncate(tmp_path / "ckpt" / "step-00000004.pt")
    with caplog.at_level("WARNING"):
        assert ckpt.latest(tmp_path).name == "step-00000002.pt"
    assert "step-00000004.pt is damaged" in caplog.text


def test_loading_a_damaged_checkpoint_names_the_file_in_one_line(tmp_path):
    import pytest

    ckpt.save(_state(2), tmp_path, 2)
    _truncate(tmp_path / "ckpt" / "step-00000002.pt")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load(tmp_path / "last.pt")
    assert "step-00000002.pt" in str(error.value) and "\n" not in str(error.value)
    garbage = tmp_path / "notes.pt"
    garbage.write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="notes.pt"):
        ckpt.load_model(garbage)
