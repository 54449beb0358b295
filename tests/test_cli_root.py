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
