"""What every curation stage shares: atomic Parquet writes and completion markers.

A stage writes its outputs under temporary names (``*.tmp``) and renames each one when it is
complete, then writes ``DATA/_markers/<stage>.json`` last. The marker holds the stage's settings;
a stage whose marker exists with the same settings is skipped, and a stage that runs again
removes the markers of every later stage, so they run again too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovseg.curation.contract import part_name  # noqa: F401  (the stages name parts through stage)

STAGES = ("ingest", "parse", "select", "manifest", "entity_index", "pairs")
MARKERS = "_markers"


def marker_path(data: Path, stage: str) -> Path:
    return Path(data) / MARKERS / f"{stage}.json"


def read_marker(data: Path, stage: str) -> dict | None:
    path = marker_path(data, stage)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_done(data: Path, stage: str, settings: dict) -> bool:
    """True when `stage` completed in `data` with exactly these settings."""
    marker = read_marker(data, stage)
    return marker is not None and marker.get("settings") == json.loads(json.dumps(settings))


def refresh_catalog(data: Path) -> None:
    """Rebuild DATA/catalog.duckdb: a skipped stage runs it too, so a copied or moved DATA's
    catalog names its own files after any rerun."""
    from ovseg.curation.catalog import build_catalog

    build_catalog(data)


def start(data: Path, stage: str) -> None:
    """Forget `stage` and every later stage: their outputs are about to change."""
    for later in STAGES[STAGES.index(stage):]:
        marker_path(data, later).unlink(missing_ok=True)
        if later == "parse":  # parsed parts of an earlier ingest must not be resumed from
            marker_path(data, "parse_progress").unlink(missing_ok=True)


def finish(data: Path, stage: str, settings: dict, counts: dict) -> None:
    """Write the completion marker of `stage` (the last write of the stage)."""
    write_text_atomic(marker_path(data, stage), json.dumps({"settings": settings, "counts": counts}, indent=2) + "\n")


def require(data: Path, stage: str, needed_by: str) -> dict:
    marker = read_marker(data, stage)
    if marker is None:
        raise StageError(f"{needed_by} needs the {stage} stage to have completed in {data} "
                         f"(run `ovseg curate {stage.replace('_', '-')} {data}` first)")
    return marker


class StageError(RuntimeError):
    """A user-facing error of a curation stage (bad input, missing earlier stage)."""


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# pyarrow write options of the large tables the query stages write (manifest, entity_index,
# pairs): snappy writes and reads fastest (zstd trades write time for smaller files), and
# batches larger than pyarrow's default 1024 values save time again per column.
FAST_PARQUET = {"compression": "snappy", "write_batch_size": 1 << 17}
# The entity strings of parsed and manifest parts, as Parquet column paths (for `read_dictionary`).
ENTITIES_STRINGS, CHUNKS_ENTITY = "entities.list.element", "chunks.list.element.entity"


def dictionary_of(values: pa.Array) -> pa.DictionaryArray:
    """`values` as a dictionary array (as they are when read with `read_dictionary`)."""
    return values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def reset_dir(path: Path) -> Path:
    """An empty folder at `path` (whatever an interrupted run left there is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def remove_temporaries(folder: Path) -> None:
    for tmp in folder.glob("*.tmp"):
        tmp.unlink()


def parts(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.parquet"))


def duckdb_connect(threads: int | None = None, memory_limit: str | None = None, spill_dir: Path | None = None,
                   keep_order: bool = False):
    """A DuckDB connection for a stage's queries (in memory; reads and writes Parquet files).

    Beyond `memory_limit` DuckDB spills to `spill_dir` (DATA/_spill for the stages). Rows come
    in no particular order unless a query says ORDER BY, or `keep_order` is set: then a query
    without ORDER BY keeps the order of the files it reads."""
    import duckdb

    config = {"preserve_insertion_order": str(keep_order).lower()}
    if threads:
        config["threads"] = str(threads)
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(":memory:", config=config)
    con.execute("SET enable_progress_bar = false")  # stages report their own progress
    if spill_dir is not None:
        con.execute(f"SET temp_directory = {sql_path(Path(spill_dir))}")
    return con


def sql_path(path: Path) -> str:
    """A path quoted for a DuckDB string literal."""
    return "'" + str(path).replace("'", "''") + "'"
