"""Temporary marker for commands whose library part is still being built (removed once all land)."""

import typer


def pending(what: str) -> None:
    typer.echo(f"ovseg: {what} is not implemented yet", err=True)
    raise typer.Exit(2)
