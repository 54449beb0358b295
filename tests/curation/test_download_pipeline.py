"""`ovseg curate cc12m` on the synthetic world over loopback HTTP: the real ingest, spaCy parse
and DuckDB selection pick the shapes, and the download (its last step) fills downloads.parquet
for exactly the manifest, which the catalog shows."""

import duckdb
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.curation import synthetic as syn
from ovseg.curation.download import read_image
from ovseg.curation.serve import serve


@pytest.mark.slow
def test_cc12m_on_the_synthetic_world_selects_the_shapes_and_downloads_the_manifest(tmp_path):
    world = syn.generate(tmp_path / "world", syn.WorldConfig(n_train=400, n_val=0, n_test=0, seed=4))
    data = tmp_path / "data"
    with serve(world) as server:
        syn.write_captions_tsv(world, server.url)
        result = CliRunner().invoke(app, [
            "curate", "cc12m", str(data), "--source", f"{server.url}/captions.tsv", "--top-k-entities", "12",
            "--workers", "1", "--image-size", "32", "--processes", "1", "--download-threads", "8",
            "--resize-mode", "border"])
        assert result.exit_code == 0, result.output
    entities = pq.read_table(data / "entities.parquet").to_pylist()
    assert {e["entity"] for e in entities if e["selected"]} == set(syn.SHAPES)
    manifest = pads.dataset(str(data / "manifest"), format="parquet").to_table(columns=["sample_id"])
    downloads = pq.read_table(data / "downloads.parquet")
    assert downloads["sample_id"].to_pylist() == sorted(manifest["sample_id"].to_pylist())
    assert set(downloads["status"].to_pylist()) == {"success"}
    assert f"{downloads.num_rows} success" in result.output
    con = duckdb.connect(str(data / "catalog.duckdb"), read_only=True)
    try:
        joined = con.execute("SELECT count(*) FROM manifest JOIN downloads USING (sample_id) "
                             "WHERE status = 'success'").fetchone()[0]
    finally:
        con.close()
    assert joined == downloads.num_rows
    assert read_image(data, downloads["sample_id"][0]).size == (32, 32)
