"""The curation benchmark: its generated input follows the contract, and a tiny run reports real numbers."""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg.benchmarks.curate import benchmark_curate, generate_parsed
from ovseg.curation import stage
from ovseg.curation.parse import PARSED_SCHEMA


def test_generated_rows_have_1_to_4_unique_entities_with_zipf_like_counts(tmp_path):
    generate_parsed(tmp_path, 30_000, part_rows=10_000)
    parsed = pa.concat_tables([pq.read_table(p) for p in stage.parts(tmp_path / "parsed")])
    assert parsed.schema.equals(PARSED_SCHEMA) and parsed.num_rows == 30_000
    entities = parsed.column("entities").to_pylist()
    assert all(1 <= len(e) <= 4 and len(set(e)) == len(e) for e in entities)
    counts = [n for _, n in Counter(x for e in entities for x in e).most_common()]
    assert counts[0] > 5 * counts[9] > 5 * counts[99]  # a heavy head and a long tail
    assert stage.read_marker(tmp_path, "parse") is not None


@pytest.mark.slow
def test_tiny_benchmark_run_measures_every_stage_and_reports_markdown():
    from ovseg.benchmarks.results import render_section

    section, numbers = benchmark_curate(rows=20_000, parse_captions=60, ingest_rows=2_000, cores=16)
    md = render_section(section)
    assert numbers["parse"]["ours"] > 0 and numbers["parse"]["full"] > 0
    assert "ner" in numbers["parse"]["full_pipes"] and "ner" not in numbers["parse"]["ours_pipes"]
    queries = numbers["queries"]
    assert set(queries["stages"]) == {"select", "manifest", "entity_index", "pairs"}
    assert 0 < queries["peak_rss_gib"] < 4
    assert queries["stages"]["pairs"][1] > 0
    assert re.search(r"Speed-up: \*\*\d+\.\d+x\*\*", md) and "Peak resident memory" in md


def test_a_query_child_that_dies_without_reporting_is_an_error_not_a_hang():
    import multiprocessing
    import os

    import pytest

    from ovseg.benchmarks.curate import _result_of

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=os._exit, args=(3,))  # as when DuckDB's spill fills the disk
    child.start()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        _result_of(child, queue)
