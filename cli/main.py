"""The `ovseg` command. Every sub-command lives in its own module of this package and only
parses options; the work is done by library functions in ovseg.curation, ovseg.training and
ovseg.evaluation, imported inside the command so that `ovseg --help` stays instant."""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import PackageNotFoundError, version

import typer

from ovseg.cli import bench, convert, curate, demo, evaluate, segment, sql, train

app = typer.Typer(
    name="ovseg",
    help="Open-vocabulary segmentation from image-caption pairs: curate, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(curate.app, name="curate")
app.add_typer(evaluate.app, name="eval")
app.add_typer(bench.app, name="bench")
app.add_typer(convert.app, name="convert")
app.command("sql")(sql.sql)
app.command("train")(train.train)
app.command("segment")(segment.segment)
app.command("demo")(demo.demo)


def _unwrap(text: str) -> str:
    """A docstring with each paragraph on one line: Typer keeps the source's line breaks in the
    paragraphs after the first, so 100-column source lines came out ragged in an 80-column help."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Unwrap the help of every command and group of `typer_app` (taken from the docstrings)."""
    infos = [*typer_app.registered_commands, typer_app.registered_callback]
    for info in infos:
        callback = getattr(info, "callback", None)
        if callback is not None and callback.__doc__:
            callback.__doc__ = _unwrap(callback.__doc__)
    for group in typer_app.registered_groups:
        _unwrap_help(group.typer_instance)


def _version() -> str:
    try:
        return version("ovseg")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ovseg {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More log output: -v for INFO, -vv for DEBUG."
    ),
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ovseg: curate caption data, train OVSegmentor, measure zero-shot segmentation."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


_unwrap_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
