"""The root command: help, version and that heavy libraries are not loaded for them."""

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
