"""``DATA/catalog.duckdb``: one DuckDB view per table of the data contract (docs/schemas.md).

The views read the Parquet files in place (absolute paths), so ``duckdb DATA/catalog.duckdb``
and ``ovseg sql`` see the same tables. :func:`build_catalog` makes views for whichever tables
exist; every stage calls it when it finishes.
"""

from __future__ import annotations

import os
from pathlib import Path

# view name -> path under DATA (a glob for sharded tables)
TABLES = {
    "captions": "captions/part-*.parquet",
    "rejects": "rejects.parquet",
    "parsed": "parsed/part-*.parquet",
    "entities": "entities.parquet",
    "manifest": "manifest/part-*.parquet",
    "entity_index": "entity_index.parquet",
    "pairs": "pairs.parquet",
    "downloads": "downloads.parquet",
    "images": "images/*.parquet",
}
CATALOG = "catalog.duckdb"


def existing_tables(data: Path) -> dict[str, Path]:
    data = Path(data).resolve()
    return {name: data / pattern for name, pattern in TABLES.items() if any(data.glob(pattern))}


def build_catalog(data: Path) -> Path:
    """(Re)write DATA/catalog.duckdb with a view per existing table; returns its path."""
    import duckdb

    data = Path(data)
    path = data / CATALOG
    tmp = data / (CATALOG + ".tmp")
    tmp.unlink(missing_ok=True)
    Path(str(tmp) + ".wal").unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        for name, target in existing_tables(data).items():
            literal = "'" + str(target).replace("'", "''") + "'"
            union = ", union_by_name = true" if "*" in target.name else ""
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({literal}{union})')
    finally:
        con.close()
    os.replace(tmp, path)
    return path


class QueryError(RuntimeError):
    """DuckDB refused a query (its message is the error's text)."""


def connect_read_only(data: Path):
    """A read-only connection to DATA/catalog.duckdb (FileNotFoundError when there is none)."""
    import duckdb

    path = Path(data) / CATALOG
    if not path.exists():
        raise FileNotFoundError(path)
    return duckdb.connect(str(path), read_only=True)


def write_result(con, query: str, fmt: str = "table", output: Path | None = None, max_rows: int = 40) -> str:
    """Run `query`; write it to `output` in `fmt` (csv/json/parquet), or return it as text."""
    import duckdb

    try:
        relation = con.sql(query)
        if relation is None:  # a statement without a result
            return ""
        if output is not None:
            output = Path(output)
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = output.with_name(output.name + ".tmp")
            if fmt == "parquet":
                relation.write_parquet(str(tmp), compression="zstd")
            elif fmt == "csv":
                relation.write_csv(str(tmp), header=True)
            elif fmt == "json":
                literal = "'" + str(tmp).replace("'", "''") + "'"
                con.execute(f"COPY ({query.strip().rstrip(';')}) TO {literal} (FORMAT json)")
            else:
                tmp.write_text(_table_text(relation, max_rows) + "\n")
            os.replace(tmp, output)
            return ""
        if fmt == "csv":
            return _csv_text(relation)
        if fmt == "json":
            return _json_text(relation)
        return _table_text(relation, max_rows)
    except duckdb.Error as error:
        raise QueryError(str(error).strip()) from None


def _table_text(relation, max_rows: int) -> str:
    """DuckDB's own box rendering of the first `max_rows` rows."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        relation.show(max_rows=max_rows, max_width=10_000)
    return buffer.getvalue()


def _csv_text(relation) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(relation.columns)
    for row in relation.fetchall():
        writer.writerow(row)
    return buffer.getvalue()


def _json_text(relation) -> str:
    import json

    columns = relation.columns
    return "".join(json.dumps(dict(zip(columns, row)), default=str) + "\n" for row in relation.fetchall())
