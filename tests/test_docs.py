"""The manual cannot drift from the tool.

- Every `ovseg ...` and `torchrun ... -m ovseg.cli.main ...` line in a fenced block of README.md
  and docs/ (subfolders included) parses against the real CLI: click's own parser, built from the
  Typer app, down the sub-commands, without running anything; torchrun lines parse against
  torchrun's parser first. Placeholders (DATA, CKPT, OUT, ...) are ordinary arguments.
- A fenced block whose info string says `runs-in-tests` (```` ```bash runs-in-tests ````) runs,
  line by line, in a fresh folder on the small data the tests make (see `_run_block`).
- Every SQL block of docs/sql.md runs against a small curated data folder.
- Every number of README.md appears in a generated section of docs/benchmarks.md, unless it is
  listed below as not measured by ovseg.
- The manual is apart from the notebook: no dates in the prose of README.md and docs/ outside
  docs/notes/ and the generated docs/benchmarks.md; no dates or research-log citations in the
  comments and docstrings of the library and the benchmarks; every relative link resolves; the
  README's results table sits between its markers, with prose that says whose model each row is.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import typer.core

try:  # Typer 0.29 carries its own copy of click (its parser, contexts and exceptions)
    from typer._click import exceptions as click_errors
except ImportError:  # older Typer builds on click itself
    from click import exceptions as click_errors

from ovseg.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = "runs-in-tests"


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    lines: list[tuple[int, str]]  # (line number, text)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, current = [], None
    for number, text in enumerate(path.read_text().splitlines(), 1):
        stripped = text.strip()
        if stripped.startswith("```"):
            if current is None:
                current = Block(path, number, stripped[3:].strip(), [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.lines.append((number, text))
    assert current is None, f"{path}: a fenced block opened at line {current.line} is never closed"
    return blocks


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """The block's commands, with backslash-continued lines joined."""
    out, pending, start = [], "", 0
    for number, text in block.lines:
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        out.append((start, pending + text))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _is_ovseg(words: list[str]) -> bool:
    return bool(words) and Path(words[0]).name == "ovseg"


def _is_torchrun(words: list[str]) -> bool:
    return bool(words) and words[0] == "torchrun" and "ovseg.cli.main" in words


def doc_commands() -> list[tuple[str, list[str], Block]]:
    """(where, argv without the program, block) of every ovseg / torchrun line of the docs."""
    found = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            if block.info.split()[:1] not in ([], ["bash"], ["sh"], ["console"], ["shell"]):
                continue
            for number, text in logical_lines(block):
                words = shlex.split(text, comments=True)
                if _is_ovseg(words) or _is_torchrun(words):
                    found.append((f"{path.relative_to(ROOT)}:{number}", words, block))
    return found


COMMANDS = doc_commands()
# What the docs' shell variables stand for when a line is parsed (not run).
SHELL_VALUES = {"NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}


def expand(words: list[str], values: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), w) for w in words]


def click_parse(args: list[str]) -> list[str]:
    """Parse `ovseg ARGS` with click down to the leaf command; returns the command path.
    Raises click's UsageError (or typer.Exit for --version) as the CLI would."""
    command = typer.main.get_command(app)
    ctx = command.make_context("ovseg", list(args), resilient_parsing=False)
    names = ["ovseg"]
    while isinstance(command, typer.core.TyperGroup):
        protected = getattr(ctx, "_protected_args", None)
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None, f"no such command {name!r} under {' '.join(names)}"
        names.append(name)
        ctx = command.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return names


def torchrun_script_args(words: list[str]) -> list[str]:
    """torchrun's own parser over a doc line (it fails on options it takes for its own, such as a
    prefix of --run-path); returns the arguments it passes to `-m ovseg.cli.main`."""
    from torch.distributed.run import get_args_parser

    try:
        parsed = get_args_parser().parse_args(words[1:])
    except SystemExit as error:
        raise AssertionError(f"torchrun refuses the line (exit {error.code})") from None
    assert parsed.module and parsed.training_script == "ovseg.cli.main", parsed
    return list(parsed.training_script_args)


def test_the_docs_have_commands_to_check():
    wheres = {where.split(":")[0] for where, _, _ in COMMANDS}
    assert {"docs/training.md", "docs/sql.md", "docs/pipeline.md", "docs/quickstart.md"} <= wheres, wheres
    assert any(_is_torchrun(words) for _, words, _ in COMMANDS)


@pytest.mark.parametrize("where,words", [(w, words) for w, words, _ in COMMANDS], ids=[w for w, _, _ in COMMANDS])
def test_every_doc_command_parses(where, words, capsys):
    words = expand(words, SHELL_VALUES)
    args = torchrun_script_args(words) if _is_torchrun(words) else words[1:]
    try:
        click_parse(args)
    except typer.Exit as done:  # --version and other eager options: fine if it is 0
        assert done.exit_code == 0, f"{where}: exit {done.exit_code}"
    except click_errors.ClickException as error:
        pytest.fail(f"{where}: `{shlex.join(words)}` does not parse: {error.format_message()}")


def test_the_parser_check_can_fail():
    """The check above rejects what the CLI rejects (and torchrun's own swallowed options)."""
    with pytest.raises(click_errors.UsageError):
        click_parse(["train", "--no-such-option"])
    with pytest.raises(click_errors.UsageError):
        click_parse(["curate", "no-such-stage", "DATA"])
    with pytest.raises(AssertionError, match="torchrun refuses"):
        torchrun_script_args(shlex.split("torchrun --nproc-per-node 8 -m ovseg.cli.main train --run runs/paper"))
    assert torchrun_script_args(shlex.split(
        "torchrun --nproc-per-node 8 -m ovseg.cli.main train --run-dir runs/paper")) == ["train", "--run-dir", "runs/paper"]


# -- runnable blocks ---------------------------------------------------------------------------

RUNNABLE_BLOCKS = [b for path in DOC_FILES for b in fenced_blocks(path) if RUNNABLE in b.info.split()[1:]]
# A runnable training line trains the tiny `test` preset for 2 steps a stage: the test proves that
# the line's options, files and stages chain as written, not what the training learns.
CHEAP_TRAINING = ["--preset", "test", "--no-progress", "train.stages.1.steps=2", "train.stages.2.steps=2"]


def _load_training_contract():
    spec = importlib.util.spec_from_file_location("_training_conftest", ROOT / "tests" / "training" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_contract


def _run_block(block: Block, folder: Path, data: Path) -> None:
    """Run a block's lines in order in `folder`: `NAME=$(...)` through bash (the value is kept for
    later lines), `ovseg ...` in this process through the real CLI, with the word DATA standing
    for `data`."""
    from typer.testing import CliRunner

    values: dict[str, str] = {}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1"}
    for number, text in logical_lines(block):
        where = f"{block.path.relative_to(ROOT)}:{number}"
        assignment = re.match(r"\s*(\w+)=", text)
        if assignment:
            name = assignment.group(1)
            done = subprocess.run(["bash", "-c", f'{text}\nprintf %s "${name}"'], cwd=folder, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0 and done.stdout, f"{where}: {done.stderr}"
            values[name] = done.stdout
            continue
        words = shlex.split(text, comments=True)
        if not words:
            continue
        assert _is_ovseg(words), f"{where}: a runnable block holds only ovseg lines and NAME=$(...) lines"
        args = [re.sub(r"\bDATA\b", str(data), w) for w in expand(words, values)[1:]]
        if args[0] == "train":
            args += CHEAP_TRAINING
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{where}: `{shlex.join(words)}` exit {result.exit_code}\n{result.output}"


def test_there_are_runnable_blocks():
    assert {b.path.name for b in RUNNABLE_BLOCKS} >= {"training.md", "pipeline.md"}


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[b.where for b in RUNNABLE_BLOCKS])
def test_runnable_blocks_run(block, tmp_path, monkeypatch):
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    data = _load_training_contract()(tmp_path / "DATA")  # the training tests' small data contract
    _run_block(block, folder, data)


# -- SQL blocks --------------------------------------------------------------------------------

SQL_BLOCKS = [b for path in DOC_FILES for b in fenced_blocks(path) if b.info.split()[:1] == ["sql"]]


def sql_statements(block: Block) -> list[tuple[int, str]]:
    """(line, statement) for each `;`-terminated statement of a block, comments dropped."""
    out, pending, start = [], [], 0
    for number, text in block.lines:
        code = text.split("--", 1)[0]
        if not code.strip():
            continue
        if not pending:
            start = number
        pending.append(code)
        if code.rstrip().endswith(";"):
            out.append((start, "\n".join(pending).strip().rstrip(";")))
            pending = []
    assert not pending, f"{block.where}: a statement without its closing `;`"
    return out


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    """The bundled sample curated with the top 20 entities (as docs/pipeline.md does and the
    curation tests' `curated_sample`), plus a downloads table in the contract's schema (every
    other manifest sample a success) so that the after-download queries have something to read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovseg.curation.catalog import build_catalog
    from ovseg.curation.download import DOWNLOADS_SCHEMA
    from ovseg.curation.ingest import IngestConfig
    from ovseg.curation.pipeline import CurateConfig, curate
    from ovseg.curation.select import SelectConfig

    data = tmp_path_factory.mktemp("docs-sql") / "data"
    sample = ROOT / "curation" / "data" / "cc12m_sample.tsv"
    curate(data, CurateConfig(source=str(sample), ingest=IngestConfig(shard_size=100),
                              select=SelectConfig(top_k=20), threads=1))
    ids = pq.read_table(data / "manifest", columns=["sample_id"]).column("sample_id").to_pylist()
    ok = [i % 2 == 0 for i in ids]
    rows = {
        "sample_id": ids,
        "status": ["success" if good else "failed_to_download" for good in ok],
        "error_message": [None if good else "HTTP Error 404" for good in ok],
        "shard": ["00000.tar" if good else None for good in ok],
        "key": [f"{n:09d}" if good else None for n, good in enumerate(ok)],
        "offset": [512 + 1024 * n if good else None for n, good in enumerate(ok)],
        "size": [500 if good else None for good in ok],
    }
    rows.update({c.name: [64 if good else None for good in ok] for c in DOWNLOADS_SCHEMA if c.name not in rows})
    pq.write_table(pa.table(rows, schema=DOWNLOADS_SCHEMA), data / "downloads.parquet")
    build_catalog(data)
    return data


def test_sql_blocks_exist():
    assert {b.path.name for b in SQL_BLOCKS} >= {"sql.md"}
    assert sum(len(sql_statements(b)) for b in SQL_BLOCKS if b.path.name == "sql.md") >= 15


@pytest.mark.slow
@pytest.mark.parametrize("block", SQL_BLOCKS, ids=[b.where for b in SQL_BLOCKS])
def test_sql_blocks_run_on_curated_data(block, sample_data):
    from ovseg.curation.catalog import connect_read_only

    con = connect_read_only(sample_data)
    try:
        for number, statement in sql_statements(block):
            try:
                con.sql(statement).fetchall()
            except Exception as error:  # DuckDB's own errors have no common base worth naming
                pytest.fail(f"{block.path.relative_to(ROOT)}:{number}: {type(error).__name__}: {error}")
    finally:
        con.close()


# -- what the docs say about the data ----------------------------------------------------------

@pytest.mark.slow
def test_sample_top_entities_are_things(sample_data):
    """docs/pipeline.md's walkthrough shows the sample's top 20: words like `up` (the root spaCy
    gives "close up") are stoplisted, not selected."""
    from ovseg.curation.catalog import connect_read_only
    from ovseg.curation.select import default_stoplist

    con = connect_read_only(sample_data)
    selected = [row[0] for row in con.sql("SELECT entity FROM entities WHERE selected ORDER BY rank").fetchall()]
    stopped = {row[0] for row in con.sql("SELECT entity FROM entities WHERE excluded_reason = 'stoplist'").fetchall()}
    con.close()
    assert len(selected) == 20 and "up" not in selected and not set(selected) & set(default_stoplist())
    assert "up" in stopped


@pytest.mark.slow
def test_schemas_md_names_each_tables_compression(sample_data):
    """docs/schemas.md: zstd, except manifest, entity_index and pairs in snappy."""
    import pyarrow.parquet as pq

    text = (ROOT / "docs" / "schemas.md").read_text()
    snappy = {"manifest", "entity_index", "pairs"}
    assert "zstd" in text and all(f"`{name}`" in text.split("snappy")[0].rsplit("zstd", 1)[-1] for name in snappy)
    for name, pattern in {"captions": "captions/*.parquet", "rejects": "rejects.parquet", "parsed": "parsed/*.parquet",
                          "entities": "entities.parquet", "manifest": "manifest/*.parquet",
                          "entity_index": "entity_index.parquet", "pairs": "pairs.parquet"}.items():
        path = sorted(sample_data.glob(pattern))[0]
        codec = pq.ParquetFile(path).metadata.row_group(0).column(0).compression
        assert codec == ("SNAPPY" if name in snappy else "ZSTD"), (name, codec)


def test_schemas_md_marks_reserved_word_columns():
    """A column named with a reserved word of DuckDB's SQL carries ⚠ and a quoting hint."""
    import duckdb

    reserved = {row[0] for row in duckdb.sql(
        "SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category = 'reserved'").fetchall()}
    rows = re.findall(r"^\| `(\w+)`( ⚠)? \|", (ROOT / "docs" / "schemas.md").read_text(), re.M)
    assert rows
    for column, mark in rows:
        assert bool(mark) == (column in reserved), f"docs/schemas.md: column `{column}`"
    assert any(column == "offset" for column, _ in rows) and '"offset"' in (ROOT / "docs" / "schemas.md").read_text()


def test_sql_help_lists_every_view():
    from typer.testing import CliRunner

    from ovseg.curation.catalog import TABLES

    text = " ".join(CliRunner().invoke(app, ["sql", "--help"], terminal_width=200).output.split())
    for view in TABLES:
        assert re.search(rf"\b{view}\b", text), view


def test_curate_synthetic_says_when_it_drew_nothing(tmp_path):
    from typer.testing import CliRunner

    args = ["curate", "synthetic", str(tmp_path / "OUT"), "--train", "3", "--val", "1", "--test", "1"]
    first, second = CliRunner().invoke(app, args), CliRunner().invoke(app, args)
    assert first.exit_code == 0 and first.output.startswith("wrote 3 training images"), first.output
    assert second.exit_code == 0 and "drew nothing" in second.output and "wrote 3" not in second.output, second.output


def test_scoring_help_reads():
    from typer.testing import CliRunner

    text = " ".join(CliRunner().invoke(app, ["eval", "voc", "--help"], terminal_width=200).output.split())
    assert "belong to softmax" not in text and "the paper's thresholds are for softmax" in text.replace("│ ", "")


# -- README numbers ----------------------------------------------------------------------------

# Numbers of README.md that no benchmark measures, each with what it is. Anything else must be in
# a generated section of docs/benchmarks.md.
NOT_MEASURED = {
    "2023": "the paper's year (CVPR 2023)",
    "2301.09121": "the paper's arXiv id",
    "53.8": "the paper's own VOC mIoU", "20.4": "the paper's own Context mIoU", "25.1": "the paper's own COCO-Object mIoU",
    "16": "ViT-B/16, the paper's backbone",
    "3.10": "the Python version required", "3.8.0": "the spaCy model's version",
    "17": "the Java version Spark needs",
}
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)*")


def numbers(markdown: str) -> set[str]:
    """The numbers of a Markdown text outside code (fenced, inline) and link targets; thousands
    separators dropped (4,664 is 4664)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    return {m.group(0).rstrip(",.").replace(",", "") for m in NUMBER.finditer(text)}


def generated_sections(markdown: str) -> str:
    """The text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (what `ovseg bench` writes)."""
    return "\n".join(m.group(2) for m in re.finditer(r"<!-- bench:([\w-]+) -->(.*?)<!-- /bench:\1 -->", markdown, re.S))


def test_every_readme_number_is_in_a_generated_benchmark_section():
    readme = numbers((ROOT / "README.md").read_text())
    generated = numbers(generated_sections((ROOT / "docs" / "benchmarks.md").read_text()))
    assert len(generated) > 100
    missing = sorted(readme - generated - set(NOT_MEASURED), key=lambda n: float(n.split(".")[0] or 0))
    assert not missing, f"README.md numbers in no generated section of docs/benchmarks.md: {missing}"
    stale = sorted(set(NOT_MEASURED) - readme)
    assert not stale, f"NOT_MEASURED lists numbers README.md no longer has: {stale}"


def test_the_number_check_reads_markdown():
    assert numbers("took 21.6 s (4,664 steps), `--top-k 100`, [x](docs/a-30min-0.png) on 2 cores.") == {
        "21.6", "4664", "2"}
    assert generated_sections("a 1 <!-- bench:x -->b 2<!-- /bench:x --> c 3") == "b 2"


def test_the_demo_is_a_cell_of_the_readme_table():
    """Issue 28: `ovseg demo` trains the table's recipe on the table's world to one of its step
    budgets, so its mIoU is that cell's seed-0 run, and the README says so."""
    import inspect

    from ovseg.benchmarks.results import load
    from ovseg.cli.bench import bench_synthetic
    from ovseg.cli.pipeline import DemoConfig

    demo = DemoConfig(out=Path("demo-out"))
    bench = inspect.signature(bench_synthetic).parameters
    assert demo.preset == bench["preset"].default.default
    assert (demo.n_train, demo.n_val, demo.n_test) == (bench["n_train"].default.default, 100, 300)
    table = load("synthetic").tables()[0]
    assert f"{demo.steps} steps" in [c["name"] for c in table["columns"]]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"`ovseg demo` is the `+ mask (full)` cell at {demo.steps} steps, seed 0" in readme


# -- the manual apart from the notebook ---------------------------------------------------------

# The manual says what is and why; what was measured when lives in dated notes (docs/notes/) and
# the generated benchmark page. A date in the manual's prose is a status line that will go stale.
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
NOTES = ROOT / "docs" / "notes"
GENERATED_PAGES = {ROOT / "docs" / "benchmarks.md"}  # written by `ovseg bench`, dated by design
MANUAL = [p for p in DOC_FILES if NOTES not in p.parents and p not in GENERATED_PAGES]
LIBRARY = ["curation", "training", "evaluation", "cli", "benchmarks"]
# A comment or docstring that sends the reader to the notebook for its reason holds no reason.
NOTEBOOK_CITATION = re.compile(r"quality(?:-log)?\.md|docs/notes\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def dated_lines(markdown: str) -> list[str]:
    """The lines of a Markdown text whose prose (outside fenced code, link targets and HTML
    comments) holds a date."""
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), markdown, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return [line.strip() for line in text.splitlines() if DATE.search(line)]


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and every line of every docstring of a Python source."""
    import ast
    import io
    import tokenize

    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                out += [(node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
    return out


def test_the_manual_has_pages_and_the_notebook_is_apart():
    names = {p.relative_to(ROOT).as_posix() for p in MANUAL}
    assert {"README.md", "docs/recipes.md", "docs/training.md", "docs/model.md"} <= names, names
    assert (NOTES / "quality-log.md").exists() and not (ROOT / "docs" / "quality.md").exists()


def test_the_manual_carries_no_dated_prose():
    found = [f"{p.relative_to(ROOT)}: {line}" for p in MANUAL for line in dated_lines(p.read_text())]
    assert not found, "dates belong in docs/notes/ or the generated pages:\n" + "\n".join(found)


def test_the_date_check_reads_markdown():
    text = ("measured (2026-12-03) on 2 cores\nsee [the note](notes/2026-12-07-x.md)\n"
            "```bash\nls runs/2026-12-05\n```\n<!-- 2026-12-01 -->\nversion 3.10, 2026 in words")
    assert dated_lines(text) == ["measured (2026-12-03) on 2 cores"]


def test_library_comments_cite_no_date_and_no_notebook():
    """Comments and docstrings of the library and the benchmarks say what and why: no dates, no
    pointers to the research log instead of a reason."""
    found = []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in comments_and_docstrings(path.read_text()):
                if DATE.search(text) or NOTEBOOK_CITATION.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text.strip()}")
    assert not found, "\n".join(found)


def test_the_comment_check_reads_python():
    source = ('"""Module (docs/quality.md)."""\n'
              'x = "2026-12-03"  # the value, measured 2026-12-04\n'
              'def f():\n    """Why, see docs/notes/x.md."""\n    return "quality.md"\n')
    flagged = [line for line, text in comments_and_docstrings(source)
               if DATE.search(text) or NOTEBOOK_CITATION.search(text)]
    assert sorted(flagged) == [1, 2, 4], flagged


def test_relative_links_of_the_docs_resolve():
    """Every relative link of README.md and docs/ (notes included) names a file or folder that
    exists; so does every link the benchmark pages' writers put into docs/benchmarks.md."""
    broken = []
    pages = [(p, p.read_text()) for p in DOC_FILES if p not in GENERATED_PAGES]
    writers = [(ROOT / "docs" / "benchmarks.md", p.read_text()) for p in sorted((ROOT / "benchmarks").rglob("*.py"))]
    for page, text in pages + writers:
        text = re.sub(r"```.*?```", " ", text, flags=re.S)
        for target in LINK.findall(text):
            target = target.split("#", 1)[0]
            if not target or "://" in target or target.startswith("mailto:") or "{" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_readme_results_sit_between_markers_and_say_whose_model():
    """The results block is where the renderer writes it; the prose outside it says which rows
    are the paper's model and which ovseg's CPU recipe."""
    readme = (ROOT / "README.md").read_text()
    begin, end = readme.index("<!-- results:begin -->"), readme.index("<!-- results:end -->")
    block, outside = readme[begin:end], readme[:begin] + readme[end:]
    assert "| 2000 steps |" in block and "`synthetic-small`" in block
    assert readme.count("<!-- results:begin -->") == readme.count("<!-- results:end -->") == 1
    outside = " ".join(outside.split())
    assert "**The paper's model**: rows of the `paper` preset" in outside and "`synthetic-paper`" in outside
    assert "**ovseg's CPU recipe**: rows of `synthetic-small`" in outside and "It exists so that" in outside
    assert readme.index("## Results") < begin < end < readme.index("## Install")
