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
