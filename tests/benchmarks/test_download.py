"""`ovseg bench download` runs both ways for real and writes its section."""

import re

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app


@pytest.mark.slow
def test_bench_download_measures_both_ways_and_writes_its_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    result = CliRunner().invoke(app, ["bench", "download", "--images", "40", "--repeats", "1", "--shard-size", "20",
                                      "--processes", "1", "--threads", "8", "--doc", str(doc), "--results", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "<!-- bench:download -->" in text and "<!-- /bench:download -->" in text
    rates = re.findall(r"\| (plain `img2dataset`|`ovseg curate download`[^|]*) \| (\d+) \|", text)
    assert len(rates) == 2 and all(int(rate) > 0 for _, rate in rates)
    assert "40 of 40 images downloaded" in text
