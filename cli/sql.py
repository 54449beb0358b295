"""`ovseg sql QUERY`: SQL over the curated tables (DuckDB, read-only; docs/sql.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

FORMATS = ("table", "csv", "json", "parquet")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"ovseg sql: {message}", err=True)
    raise typer.Exit(code)


def sql(
    query: str = typer.Argument(..., help="The SQL query; tables: captions, rejects, parsed, entities, manifest, "
                                          "entity_index, pairs, downloads, images (docs/schemas.md); quote reserved words: \"offset\"."),
    data: Path = typer.Option(Path("data"), "--data", "-d", help="The data folder holding catalog.duckdb."),
    fmt: str = typer.Option("table", "--format", "-f", help="table (printed), csv, json (one object per line) or parquet."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result to this file (needed for parquet)."),
    max_rows: int = typer.Option(40, "--max-rows", help="Rows a printed table shows (the rest are counted)."),
) -> None:
    """Run SQL over the curated tables of DATA (read-only).

    Example: ovseg sql "SELECT entity, n_samples FROM entities WHERE selected ORDER BY rank" --data DATA"""
    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet" and output is None:
        _fail("--format parquet needs --output FILE")
    if not data.is_dir():
        _fail(f"no data folder {data} (run `ovseg curate cc12m {data}` first, or pass --data)")
    from ovseg.curation.catalog import CATALOG, connect_read_only, QueryError, write_result

    try:
        con = connect_read_only(data)
    except FileNotFoundError:
        _fail(f"no {CATALOG} in {data} (run a curation stage into it first)")
    try:
        text = write_result(con, query, fmt, output, max_rows)
    except QueryError as error:
        _fail(str(error), code=1)
    finally:
        con.close()
    if text:
        typer.echo(text.rstrip("\n"))
