"""`ovseg curate cc12m` takes the download's options and downloads a new manifest afresh
(issue 30 item 3), and refuses a DATA that is a file (issue 26 item 13)."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ovseg.cli import curate as curate_cli
from ovseg.cli.main import app

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_curate(data, cfg, force=False, report=None):
        seen["curate_force"] = force
        return {"manifest": SimpleNamespace(skipped=seen.get("manifest_skipped", True))}

    def fake_download(data, cfg, force=False, command="download", new_manifest_restarts=False):
        seen.update(cfg=cfg, force=force, restarts=new_manifest_restarts)
    monkeypatch.setattr("ovseg.curation.pipeline.curate", fake_curate)
    monkeypatch.setattr(curate_cli, "run_download", fake_download)
    return seen


def test_cc12m_passes_every_download_option_on(captured, tmp_path):
    result = runner.invoke(app, ["curate", "cc12m", str(tmp_path / "d"), "--source", "x.tsv", "--timeout", "3.5",
                                 "--retries", "2", "--max-image-area", "1000000", "--images-per-tar", "500",
                                 "--shard-size", "7"])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert (cfg.timeout, cfg.retries, cfg.max_image_area, cfg.shard_size) == (3.5, 2, 1e6, 500)
    assert captured["force"] is False


def test_cc12m_force_reaches_the_download(captured, tmp_path):
    assert runner.invoke(app, ["curate", "cc12m", str(tmp_path / "d"), "--source", "x.tsv", "--force"]).exit_code == 0
    assert captured["force"] is True and captured["curate_force"] is True


def test_cc12m_downloads_a_new_manifest_afresh(captured, tmp_path):
    assert runner.invoke(app, ["curate", "cc12m", str(tmp_path / "d"), "--source", "x.tsv"]).exit_code == 0
    assert captured["restarts"] is True and captured["force"] is False


def test_a_data_folder_that_is_a_file_is_a_one_line_error(tmp_path):
    a_file = tmp_path / "data"
    a_file.write_text("")
    for args in (["cc12m", str(a_file), "--source", "x.tsv"], ["ingest", str(a_file), "--source", "x.tsv"]):
        result = runner.invoke(app, ["curate", *args])
        assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_new_selection_downloads_again_and_downloads_matches_the_new_manifest(tmp_path):
    from ovseg.curation import synthetic as syn
    from ovseg.curation.catalog import connect_read_only
    from ovseg.curation.serve import serve

    world = syn.generate(tmp_path / "world", syn.WorldConfig(n_train=120, n_val=0, n_test=0, seed=5))
    data = tmp_path / "data"
    common = ["--workers", "1", "--image-size", "16", "--processes", "1", "--download-threads", "4",
              "--images-per-tar", "25", "--timeout", "5", "--retries", "1"]
    with serve(world) as server:
        syn.write_captions_tsv(world, server.url)
        source = ["--source", f"{server.url}/captions.tsv"]
        first = runner.invoke(app, ["curate", "cc12m", str(data), *source, "--top-k-entities", "12", *common])
        assert first.exit_code == 0, first.output
        n_first = pq.read_table(data / "downloads.parquet").num_rows
        assert len(list((data / "images").glob("*.tar"))) == -(-n_first // 25)
        again = runner.invoke(app, ["curate", "cc12m", str(data), *source, "--top-k-entities", "2", *common])
        assert again.exit_code == 0, again.output
    manifest = pads.dataset(str(data / "manifest"), format="parquet").to_table(columns=["sample_id"])
    downloads = pq.read_table(data / "downloads.parquet")
    assert manifest.num_rows < n_first
    assert downloads["sample_id"].to_pylist() == sorted(manifest["sample_id"].to_pylist())
    con = connect_read_only(data)
    assert con.sql("SELECT count(*) FROM downloads").fetchall() == [(manifest.num_rows,)]
