"""``DATA/catalog.duckdb``: one DuckDB view per table of the data contract (docs/schemas.md).

The catalog's views name the Parquet files of DATA by absolute path, so ``duckdb
DATA/catalog.duckdb`` sees the tables; every stage rebuilds it when it runs or is skipped, so a
copied or moved DATA points at its own files after its next run. ``ovseg sql`` does not trust
those paths: :func:`connect_read_only` opens the catalog read-only and shadows each view with the
files found in DATA now, then switches off DuckDB's access to any file (no ``COPY ... TO``, no
``EXPORT DATABASE``, no extension install) and locks that setting.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ovseg.curation.contract import CATALOG_FILE as CATALOG, DOWNLOADS_FILE, TABLES  # TABLES: view name -> path under DATA
# The stage whose completion marker vouches for each table (the download keeps its own state).
OWNER = {"captions": "ingest", "rejects": "ingest", "parsed": "parse", "entities": "select",
         "manifest": "manifest", "entity_index": "entity_index", "pairs": "pairs",
         "downloads": "download", "images": "download"}
_MAGIC = b"PAR1"


def is_parquet(path: Path) -> bool:
    """True when `path` starts and ends with Parquet's magic (a killed writer's 0-byte or cut file
    does not)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _MAGIC:
                return False
            f.seek(-4, os.SEEK_END)
            return f.read(4) == _MAGIC
    except OSError:
        return False


def table_files(data: Path) -> dict[str, list[Path]]:
    """view name -> the complete Parquet files of that table in DATA (absolute, sorted)."""
    data = Path(data).resolve()
    out = {}
    for name, pattern in TABLES.items():
        files = [p for p in sorted(data.glob(pattern)) if is_parquet(p)]
        if files:
            out[name] = files
    return out


def existing_tables(data: Path) -> dict[str, Path]:
    data = Path(data).resolve()
    return {name: data / TABLES[name] for name in table_files(data)}


def _files_literal(files: list[Path]) -> str:
    return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"


def build_catalog(data: Path) -> Path:
    """(Re)write DATA/catalog.duckdb with a view per existing table; returns its path."""
    import duckdb

    data = Path(data)
    path = data / CATALOG
    tmp = data / (CATALOG + ".tmp")
    tmp.unlink(missing_ok=True)
    Path(str(tmp) + ".wal").unlink(missing_ok=True)
    con = duckdb.connect(str(tmp), config={"autoinstall_known_extensions": "false"})
    try:
        for name, files in table_files(data).items():
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({_files_literal(files)}, '
                        f'union_by_name = true)')
    finally:
        con.close()
    os.replace(tmp, path)
    return path


def unfinished(data: Path) -> dict[str, list[str]]:
    """stage -> its tables present in DATA without the stage's completion marker (partial or stale)."""
    data = Path(data)
    out: dict[str, list[str]] = {}
    for name in table_files(data):
        owner = OWNER[name]
        if owner == "download":
            done = _download_complete(data)
        else:
            done = (data / "_markers" / f"{owner}.json").exists()
        if not done:
            out.setdefault(owner, []).append(name)
    return out


def _download_complete(data: Path) -> bool:
    """The download finished, and after the manifest it downloaded was last built."""
    try:
        complete = bool(json.loads((data / ".download" / "state.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False
    manifest, downloads = data / "_markers" / "manifest.json", data / DOWNLOADS_FILE
    if complete and manifest.exists() and downloads.exists():
        return downloads.stat().st_mtime_ns >= manifest.stat().st_mtime_ns
    return complete


class QueryError(RuntimeError):
    """DuckDB refused a query (its message is the error's text)."""


def connect_read_only(data: Path):
    """A connection that can read DATA's tables and write nothing (FileNotFoundError without a catalog).

    The catalog is opened read-only; each table is a view over DATA's own files (read through
    pyarrow, so DuckDB itself needs no file access); then DuckDB's external access is switched off
    and the configuration locked: no statement can write a file, read another one or install
    an extension."""
    import duckdb
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    path = Path(data) / CATALOG
    if not path.exists():
        raise FileNotFoundError(path)
    config = {"autoinstall_known_extensions": "false", "autoload_known_extensions": "false",
              "allow_community_extensions": "false"}
    con = duckdb.connect(str(path), read_only=True, config=config)
    for name, files in table_files(data).items():
        schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
        con.register(name, ds.dataset([str(f) for f in files], schema=schema, format="parquet"))
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


# --- writing a result ------------------------------------------------------------------------

def write_result(con, query: str, fmt: str = "table", output: Path | None = None, max_rows: int = 40,
                 stream=None) -> None:
    """Run `query`; write the result in `fmt` to `output` (atomically) or to `stream` (stdout).

    csv, json and parquet stream record batches: memory stays bounded whatever the result's size."""
    import duckdb

    stream = stream or sys.stdout
    tmp = None
    try:
        relation = con.sql(query)
        if relation is None:  # a statement without a result
            return
        if output is None:
            _write(relation, fmt, stream, max_rows)
            return
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        if fmt == "parquet":
            _write_parquet(relation, tmp)
        else:
            with open(tmp, "w", newline="") as f:
                _write(relation, fmt, f, max_rows)
        os.replace(tmp, output)
        tmp = None
    except duckdb.Error as error:
        raise QueryError(str(error).strip()) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


BATCH_ROWS = 10_000


def _reader(relation):
    """The result as a stream of Arrow record batches."""
    if hasattr(relation, "to_arrow_reader"):
        return relation.to_arrow_reader(BATCH_ROWS)
    return relation.fetch_record_batch(BATCH_ROWS)


def _batches(relation):
    yield from _reader(relation)


def _write(relation, fmt: str, f, max_rows: int) -> None:
    if fmt == "csv":
        import csv

        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(relation.columns)
        for batch in _batches(relation):
            for row in batch.to_pylist():
                writer.writerow([_csv_cell(v) for v in row.values()])
    elif fmt == "json":
        for batch in _batches(relation):
            f.write("".join(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n"
                            for row in batch.to_pylist()))
    else:
        f.write(_table_text(relation, max_rows).rstrip("\n") + "\n")


def _write_parquet(relation, path: Path) -> None:
    import pyarrow.parquet as pq

    reader = _reader(relation)
    with pq.ParquetWriter(path, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)


def _json_default(value):
    """JSON for what json.dumps does not know: decimals as numbers, times as ISO text."""
    import datetime
    import decimal
    import uuid

    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _csv_cell(value):
    """A CSV cell: nested values (lists, structs, maps) as JSON text, not a Python repr."""
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    if value is None:
        return ""
    return value


def _table_text(relation, max_rows: int) -> str:
    """DuckDB's own box rendering of the first `max_rows` rows (0: the columns and the count)."""
    import contextlib
    import io

    if max_rows == 0:
        count = relation.aggregate("count(*)").fetchall()[0][0]
        return f"{', '.join(relation.columns)}\n{count} rows (--max-rows 0: none shown)"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        relation.show(max_rows=max_rows, max_width=10_000)
    return buffer.getvalue()
