"""The root command: help, version and that heavy libraries are not loaded for them."""

import os
import subprocess
import sys

from typer.testing import CliRunner

from ovseg.cli.main import app


def test_version_prints_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("ovseg ")


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from ovseg.cli.main import app; "
        "heavy = [m for m in ('torch', 'spacy', 'duckdb', 'img2dataset', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def test_no_help_text_is_eaten_as_rich_markup():
    """Rich renders help as markup, so an unescaped "[default: ...]" silently disappears."""
    import re

    import typer

    root = typer.main.get_command(app)
    eaten = []
    for path, command in _commands(root):
        for param in command.params:
            text = getattr(param, "help", None) or ""
            if re.search(r"(?<!\\)\[[a-zA-Z/]", text):
                eaten.append(f"{' '.join(path)} {param.name}: {text}")
    assert root.commands and not eaten


def test_help_paragraphs_are_rewrapped_to_the_terminal():
    """Typer keeps a docstring's line breaks after its first paragraph; the source's breaks
    must not reach the help screen, where they made ragged lines."""
    import typer

    root = typer.main.get_command(app)
    wrapped = [" ".join(path) for path, command in _commands(root)
               if any("\n" in p and not p.startswith("\b") for p in (command.help or "").split("\n\n"))]
    assert len(list(_commands(root))) > 10 and not wrapped
    # wide enough for the paragraph's source lines: a kept line break would split the phrase
    code = "from ovseg.cli.main import main; main()"
    shown = subprocess.run([sys.executable, "-c", code, "bench", "synthetic", "--help"], capture_output=True,
                           text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert any("and is evaluated on the test split" in line for line in shown.splitlines())
