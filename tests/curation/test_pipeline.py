"""The whole curation: end to end on the bundled sample, resume after SIGKILL, parallel workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ovseg.curation import stage
from ovseg.curation.ingest import IngestConfig
from ovseg.curation.pipeline import CurateConfig, curate
from ovseg.curation.select import SelectConfig

from .conftest import SAMPLE_TSV  # noqa: F401  (importlib mode: resolved through the package path)


def _tables(data: Path) -> dict[str, object]:
    """Every Parquet file of a data folder, by relative path, as a table."""
    return {str(p.relative_to(data)): pq.read_table(p) for p in sorted(data.rglob("*.parquet"))}


def _config(shard_size: int, workers: int = 1) -> CurateConfig:
    return CurateConfig(source=str(SAMPLE_TSV), ingest=IngestConfig(shard_size=shard_size), workers=workers,
                        select=SelectConfig(top_k=20), threads=1)


def test_bundled_sample_curates_with_every_row_accounted_for(curated_sample):
    ingest = stage.read_marker(curated_sample, "ingest")["counts"]
    assert ingest["rows"] == sum(1 for _ in open(SAMPLE_TSV, "rb")) == ingest["kept"] + ingest["rejected"]
    assert ingest["rejected"] >= 5
    for name in stage.STAGES:
        assert stage.read_marker(curated_sample, name) is not None, name
    entities = pq.read_table(curated_sample / "entities.parquet").to_pylist()
    assert sum(r["selected"] for r in entities) == 20
    assert next(r for r in entities if r["entity"] == "photo")["excluded_reason"] == "stoplist"
    assert any(r["entity"] == "person" and r["selected"] for r in entities)
    assert (curated_sample / "catalog.duckdb").exists()


def test_a_finished_run_is_skipped_stage_by_stage(curated_sample):
    results = curate(curated_sample, _config(100))
    assert all(r.skipped for r in results.values())


@pytest.mark.slow
def test_sigkill_mid_parse_then_rerun_gives_the_uninterrupted_output(tmp_path, nlp):
    reference = tmp_path / "reference"
    curate(reference, _config(20))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "ovseg.cli.main", "curate", "cc12m", str(killed), "--source", str(SAMPLE_TSV),
               "--shard-size", "20", "--workers", "1", "--top-k-entities", "20", "--threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(list((killed / "parsed").glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "parse never started"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = len(list((killed / "parsed").glob("part-*.parquet")))
    assert done < len(list((killed / "captions").glob("part-*.parquet")))  # really killed mid-parse
    assert stage.read_marker(killed, "parse") is None

    results = curate(killed, _config(20))
    assert results["ingest"].skipped and not results["parse"].skipped
    assert results["parse"].parsed_now == results["parse"].samples - 20 * done  # only the missing parts
    assert not list(killed.rglob("*.tmp"))
    ref, got = _tables(reference), _tables(killed)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert got[name].equals(ref[name]), name


@pytest.mark.slow
def test_parallel_workers_write_the_same_parts_as_one_process(tmp_path, curated_sample):
    curate(tmp_path / "two", _config(100, workers=2))
    one, two = _tables(curated_sample), _tables(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        assert two[name].equals(one[name]), name


def test_reingesting_a_changed_source_discards_parts_parsed_from_the_old_one(tmp_path, nlp):
    from ovseg.curation.ingest import ingest_tsv
    from ovseg.curation.parse import parse

    src, data = tmp_path / "cc.tsv", tmp_path / "data"
    src.write_text("https://e.com/1.jpg\tA dog on a sofa\nhttps://e.com/2.jpg\tA cat in a box\n")
    ingest_tsv(src, data, IngestConfig(shard_size=1))
    parse(data)
    src.write_text("https://e.com/1.jpg\tA horse in a field\nhttps://e.com/2.jpg\tA cat in a box\n")
    ingest_tsv(src, data, IngestConfig(shard_size=1), force=True)
    assert not parse(data).skipped
    assert pq.read_table(data / "parsed" / "part-00000.parquet").column("entities").to_pylist() == [["horse", "field"]]
