"""The "may import" table of docs/architecture.md (and DESIGN.md section 1), enforced on the source:

| package | may import of ovseg |
|---|---|
| `ovseg.curation` | nothing else |
| `ovseg.training` | `ovseg.curation.contract` only |
| `ovseg.evaluation` | `ovseg.training`, `ovseg.curation.contract` |

and no library package imports `ovseg.benchmarks` or `ovseg.cli`; `ovseg.benchmarks` imports the
library (and itself) but never `ovseg.cli`. Every import statement counts,
module level or inside a function, absolute or relative, and so does a module name in
`importlib.import_module("...")` or a `python -m ...` argument list.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = re.compile(r"ovseg(\.\w+)+")
LIBRARY = ("curation", "training", "evaluation")
ALLOWED = {
    "curation": ("ovseg.curation",),
    "training": ("ovseg.training", "ovseg.curation.contract"),
    "evaluation": ("ovseg.evaluation", "ovseg.training", "ovseg.curation.contract"),
}
# Imports that break the table, as (file, module), each listed so that any new one fails the
# test; an entry whose import is gone fails it too, so the list only shrinks. None today: should
# one be needed while issue 27's layout lands, add it here with a comment naming the issue.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_modules(path: Path, package: str) -> set[str]:
    """Every ovseg module `path` (a file of the package folder `package`) imports."""
    parts = ["ovseg", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    here = parts[:-1] if path.name != "__init__.py" else parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "") if node.level == 0 else ".".join(
                here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if base == "ovseg")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE.fullmatch(node.value):
            found.add(node.value)  # import_module("ovseg.x"), [python, "-m", "ovseg.x"]
    return {name for name in found if name.startswith("ovseg.") or name == "ovseg"}


def violations() -> set[tuple[str, str]]:
    out = set()
    for package in LIBRARY:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imported_modules(path, package):
                if name == "ovseg" or not _within(name, ALLOWED[package]):
                    out.add((str(path.relative_to(ROOT)), name))
    return out


def test_library_packages_import_only_what_the_table_allows():
    found = violations()
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "imports the table of docs/architecture.md forbids:\n" + "\n".join(f"{f}: {m}" for f, m in new)
    stale = sorted(KNOWN_VIOLATIONS - found)
    assert not stale, "known violations that are gone (remove them from KNOWN_VIOLATIONS):\n" + "\n".join(
        f"{f}: {m}" for f, m in stale)


def test_no_library_package_imports_benchmarks_or_cli():
    bad = sorted((f, m) for f, m in violations() | KNOWN_VIOLATIONS
                 if _within(m, ("ovseg.benchmarks", "ovseg.cli")))
    assert not bad, bad


def test_the_contract_is_a_leaf_that_imports_nothing_else_of_ovseg():
    """Training and evaluation may import `ovseg.curation.contract`: it must not bring the rest of
    curation (or anything else of ovseg) in with it."""
    path = ROOT / "curation" / "contract.py"
    assert path.exists()
    assert not sorted(n for n in imported_modules(path, "curation") if not _within(n, ("ovseg.curation.contract",)))


def test_benchmarks_never_import_the_cli():
    bad = sorted((str(path.relative_to(ROOT)), name) for path in sorted((ROOT / "benchmarks").rglob("*.py"))
                 for name in imported_modules(path, "benchmarks") if _within(name, ("ovseg.cli",)))
    assert not bad, bad


def test_benchmark_and_diagnostic_drivers_live_in_benchmarks_not_the_library():
    """Issue 27: every benchmark, diagnostic and experiment driver moved to `benchmarks/`."""
    moved = ["curation/_curate_bench.py", "curation/_download_bench.py", "training/bench.py",
             "training/model/benchmark.py", "evaluation/benchmark.py", "evaluation/mask_targets.py",
             "evaluation/diagnostics.py", "cli/quality.py", "cli/mask_targets.py"]
    assert not [m for m in moved if (ROOT / m).exists()]


@pytest.mark.parametrize("package,source,ok", [
    ("curation", "from ovseg.training.data import x", False),
    ("curation", "from ovseg.curation import stage", True),
    ("training", "import ovseg.curation.download", False),
    ("training", "from ovseg.curation.contract import read_member", True),
    ("training", "from ovseg.evaluation import metrics", False),
    ("training", "def f():\n    from ovseg.cli import main", False),
    ("training", "from ..curation import stage", False),
    ("training", "from . import engine", True),
    ("evaluation", "from ovseg.training.checkpoint import load_model", True),
    ("evaluation", "from ovseg.benchmarks import eval", False),
    ("evaluation", "import importlib\nimportlib.import_module('ovseg.cli.main')", False),
    ("curation", "from ovseg import training", False),
])
def test_the_rule_reads_every_form_of_import(tmp_path, monkeypatch, package, source, ok):
    folder = tmp_path / package
    folder.mkdir()
    (folder / "probe.py").write_text(source + "\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    names = imported_modules(folder / "probe.py", package)
    assert names, source
    assert all(n != "ovseg" and _within(n, ALLOWED[package]) for n in names) == ok, names
