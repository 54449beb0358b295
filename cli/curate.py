"""`ovseg curate ...`: the curation stages (docs/pipeline.md)."""

import typer

app = typer.Typer(help="Curate caption data into a manifest, entity index and pairs; download images.", no_args_is_help=True)
