"""`ovseg sql` reads DATA and nothing else, writes nothing, and prints results faithfully (issue 26)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app

runner = CliRunner()


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(curated_sample, tmp_path):
    """A private copy of the curated sample (a test that writes must not spoil the shared one)."""
    from ovseg.curation.catalog import build_catalog

    copy = tmp_path / "data"
    shutil.copytree(curated_sample, copy)
    build_catalog(copy)  # its views name the copy's own files, as a stage run in it leaves them
    return copy


def _sql(data, query, *extra):
    return runner.invoke(app, ["sql", query, "--data", str(data), *extra])


@pytest.mark.parametrize("statement", [
    "COPY (SELECT * FROM entities WHERE false) TO '{data}/entities.parquet' (FORMAT parquet)",
    "COPY (SELECT * FROM entities WHERE false) TO '{data}/entities.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "COPY (SELECT * FROM captions LIMIT 1) TO '{data}/captions/part-99999.parquet' (FORMAT parquet)",
    "COPY entities TO '{outside}/x.csv'",
    "EXPORT DATABASE '{data}/export'",
    "SELECT * FROM read_text('/etc/hostname')",
    "INSTALL httpfs",
    "SET enable_external_access = true",
    "SET autoinstall_known_extensions = true",
    "CREATE TABLE t AS SELECT 1",
])
def test_sql_refuses_every_write_read_outside_and_extension_install(data, tmp_path, statement):
    before = _digest(data)
    result = _sql(data, statement.format(data=data, outside=tmp_path))
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert _digest(data) == before
    assert not (tmp_path / "x.csv").exists()
    assert _sql(data, "SELECT count(*) FROM entities").exit_code == 0


def test_sql_reads_the_copy_it_is_given_not_the_folder_it_was_copied_from(data, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    shutil.rmtree(data)  # the catalog's absolute paths now name nothing
    result = _sql(moved, "SELECT count(*) AS n FROM captions", "-f", "csv")
    assert result.exit_code == 0, result.output
    assert int(result.output.splitlines()[1]) > 0


def test_sql_notes_a_stage_that_has_not_completed(data):
    (data / "_markers" / "pairs.json").unlink()
    result = _sql(data, "SELECT count(*) FROM pairs")
    assert result.exit_code == 0
    assert "pairs stage" in result.output and "not completed" in result.output
    assert "ingest stage" not in _sql(data.parent / "data", "SELECT 1").output


def test_sql_skips_a_zero_byte_parquet_left_by_a_killed_writer(data):
    from ovseg.curation.catalog import build_catalog

    (data / "images").mkdir()
    (data / "images" / "00000.parquet").write_bytes(b"")
    (data / "manifest" / "part-99999.parquet").write_bytes(b"")
    build_catalog(data)
    result = _sql(data, "SELECT count(*) FROM manifest")
    assert result.exit_code == 0, result.output


def test_sql_json_writes_numbers_csv_writes_nested_values_as_json(data, tmp_path):
    query = "SELECT 1.25::DECIMAL(5,2) AS d, {'a': 1, 'b': [2, 3]} AS s -- a trailing comment"
    on_stdout = _sql(data, query, "-f", "json")
    assert on_stdout.exit_code == 0, on_stdout.output
    assert json.loads(on_stdout.output) == {"d": 1.25, "s": {"a": 1, "b": [2, 3]}}
    out = tmp_path / "r.json"
    assert _sql(data, query, "-f", "json", "-o", str(out)).exit_code == 0
    assert json.loads(out.read_text()) == json.loads(on_stdout.output)
    csv_out = _sql(data, query, "-f", "csv")
    assert csv_out.output.splitlines()[1] == '1.25,"{""a"": 1, ""b"": [2, 3]}"'


def test_sql_max_rows_zero_shows_no_row_and_negative_is_an_error(data):
    zero = _sql(data, "SELECT entity FROM entities", "--max-rows", "0")
    assert zero.exit_code == 0 and "rows" in zero.output
    assert "person" not in zero.output
    negative = _sql(data, "SELECT 1", "--max-rows", "-1")
    assert negative.exit_code == 2 and "--max-rows" in negative.output


def test_sql_output_errors_are_one_line_and_leave_nothing(data, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    result = _sql(data, "SELECT 1", "-f", "csv", "-o", str(folder))
    assert result.exit_code == 2 and "is a folder" in result.output and "Traceback" not in result.output
    assert list(tmp_path.glob("*.tmp")) == [] and list(folder.iterdir()) == []
    inside = _sql(data, "SELECT 1", "-f", "csv", "-o", str(data / "x.csv"))
    assert inside.exit_code == 2 and not (data / "x.csv").exists()
    a_file = tmp_path / "f"
    a_file.write_text("")
    assert _sql(a_file, "SELECT 1").exit_code == 2


def test_sql_csv_to_stdout_streams_in_batches(data, monkeypatch):
    from ovseg.curation import catalog

    monkeypatch.setattr(catalog, "BATCH_ROWS", 7)
    batches = []
    real = catalog._batches

    def counted(relation):
        for batch in real(relation):
            batches.append(batch.num_rows)
            yield batch
    monkeypatch.setattr(catalog, "_batches", counted)
    result = _sql(data, "SELECT * FROM range(50)", "-f", "csv")
    assert result.exit_code == 0 and len(result.output.splitlines()) == 51
    assert max(batches) <= 7 and sum(batches) == 50


def test_a_rerun_in_a_copied_data_folder_makes_its_catalog_name_its_own_files(curated_sample, tmp_path):
    import duckdb

    from ovseg.curation.ingest import IngestConfig
    from ovseg.curation.pipeline import CurateConfig, curate
    from ovseg.curation.select import SelectConfig

    from .conftest import SAMPLE_TSV

    copy = tmp_path / "copy"
    shutil.copytree(curated_sample, copy)
    results = curate(copy, CurateConfig(source=str(SAMPLE_TSV), ingest=IngestConfig(shard_size=100),
                                        select=SelectConfig(top_k=20), threads=1))
    assert all(r.skipped for r in results.values())
    con = duckdb.connect(str(copy / "catalog.duckdb"), read_only=True)
    sqls = [r[0] for r in con.execute("SELECT sql FROM duckdb_views() WHERE NOT internal").fetchall()]
    assert sqls and all(str(copy.resolve()) in s and str(curated_sample) not in s for s in sqls)
