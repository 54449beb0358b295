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
    """Run SQL over the curated tables of DATA (read-only: no statement can write a file).

    Example: ovseg sql "SELECT entity, n_samples FROM entities WHERE selected ORDER BY rank" --data DATA"""
    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "parquet" and output is None:
        _fail("--format parquet needs --output FILE")
    if max_rows < 0:
        _fail(f"--max-rows must be 0 or more, not {max_rows}")
    if not data.is_dir():
        what = "is not a folder" if data.exists() else "does not exist"
        _fail(f"no data folder {data}: it {what} (run `ovseg curate cc12m {data}` first, or pass --data)")
    if output is not None:
        if output.is_dir():
            _fail(f"--output {output} is a folder; give a file name")
        if output.resolve().is_relative_to(data.resolve()):
            _fail(f"--output {output} is inside the data folder {data}; ovseg sql never writes there")
    from ovseg.curation.catalog import CATALOG, QueryError, connect_read_only, unfinished, write_result

    try:
        con = connect_read_only(data)
    except FileNotFoundError:
        _fail(f"no {CATALOG} in {data} (run a curation stage into it first)")
    for name, tables in unfinished(data).items():
        typer.echo(f"ovseg sql: note: the {name} stage of {data} has not completed; "
                   f"{', '.join(tables)} may be partial or stale (rerun `ovseg curate`)", err=True)
    try:
        write_result(con, query, fmt, output, max_rows)
    except QueryError as error:
        _fail(str(error).strip().splitlines()[0], code=1)
    except OSError as error:
        _fail(f"cannot write {output}: {error.strerror or error}")
    finally:
        con.close()
