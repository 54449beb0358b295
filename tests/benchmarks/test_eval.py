"""`ovseg bench eval` times the real evaluation loop and writes its own section."""

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app


@pytest.mark.slow
def test_bench_eval_writes_a_measured_section_per_preset_and_protocol(tmp_path):
    from ovseg.benchmarks.results import Section, load, save

    doc = tmp_path / "benchmarks.md"
    save(Section("other", "Other", "ovseg bench other").text("kept"), tmp_path / "results")
    result = CliRunner().invoke(app, ["bench", "eval", "--presets", "test", "--images", "2",
                                      "--synthetic-images", "3", "--threads", "1", "--doc", str(doc), "--results", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "kept" in text and "<!-- bench:eval -->" in text  # the page holds every stored section
    assert load("eval", tmp_path / "results").command.startswith("ovseg bench eval --presets test")
    rows = [line for line in text.splitlines() if line.startswith("| test |")]
    assert [r.split("|")[2].strip() for r in rows] == ["paper", "training-free", "synthetic"]
    assert rows[0].split("|")[6].strip() == "2"  # 500x375 at short side 448: two 448 windows
    assert rows[1].split("|")[6].strip() == "6"  # 448x336: 2 x 3 windows of 224, stride 112
    assert all(float(r.split("|")[7]) > 0 for r in rows)


def test_bench_eval_rejects_an_unknown_preset(tmp_path):
    result = CliRunner().invoke(app, ["bench", "eval", "--presets", "nope", "--doc", str(tmp_path / "b.md"), "--results", str(tmp_path / "results")])
    assert result.exit_code == 2 and not (tmp_path / "b.md").exists()
