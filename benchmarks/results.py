"""Benchmark results stored as data, and the one renderer of docs/benchmarks.md and README's
results block.

Layout: one JSON file per section, `benchmarks/results/<section>.json` (the section is the name
`ovseg bench` writes it under, e.g. `train`, `model-cuda`, `synthetic`):

    {
      "section": "train",
      "title": "Training throughput (`ovseg bench train --device cpu`)",
      "command": "ovseg bench train --device cpu --steps 10",     # what produced it
      "measured": "YYYY-MM-DD HH:MM UTC",
      "machine": {"arch": "x86_64", "logical_cpus": 2, "python": "3.11.7", ...},
      "notes": ["...", ...],                                   # caveats, after the header
      "blocks": [                                              # the body, in order
        {"text": "a paragraph of Markdown"},
        {"heading": "a sub-heading"},
        {"table": {"columns": [{"name": "steps/s", "align": "right", "format": ".2f"}, ...],
                   "rows": [["test", 23.68, ...], ...]}},
        {"image": {"alt": "...", "path": "images/x.png"}}
      ]
    }

A table cell is a number (written with its column's `format`, a Python format spec), a string
(written as is) or null (empty). `render_doc` writes every section in a fixed order between
`<!-- bench:NAME -->` markers; `render_readme` rewrites README's block between
`<!-- results:begin -->` and `<!-- results:end -->`. Both are pure functions of the JSON files,
so rendering twice gives the same bytes, and nothing reads the Markdown back.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ovseg.benchmarks.measure import describe, machine, now

RESULTS = Path("benchmarks/results")
DOC = Path("docs/benchmarks.md")
README = Path("README.md")
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
# the sections whose first table README shows, each when stored: on the standard world ovseg's
# CPU recipe, the paper's model as is and with ovseg's remedy switches; then the same on the
# textured world
README_SECTIONS = ("synthetic", "synthetic-standard-synthetic-paper",
                   "synthetic-standard-synthetic-paper-cnn-text-dropout-0-center-grounding",
                   "synthetic-textured-synthetic-small", "synthetic-textured-synthetic-paper-cnn-text-dropout-0-center-grounding")

HEADER = """# Benchmarks

Generated: do not edit. Every section below is rendered from one JSON file of
`benchmarks/results/` (the rows, the command that measured them, the machine and the date),
which `ovseg bench NAME` writes; `ovseg bench render` renders this page again from those files.
Each section describes the code and presets of the day it was measured.
"""

# sections in this order first, then any other by name
ORDER = ("download", "curate", "train", "train-cuda", "batch-plan", "model", "model-cuda", "eval", "eval-cuda", "synthetic",
         "world", "mask-targets")


class Blocks:
    """A body of blocks (see the module doc) built in order: text, sub-headings, tables, images."""

    def __init__(self, blocks: list[dict] | None = None):
        self.blocks = blocks if blocks is not None else []

    def text(self, markdown: str) -> "Blocks":
        self.blocks.append({"text": markdown.strip()})
        return self

    def heading(self, title: str) -> "Blocks":
        self.blocks.append({"heading": title})
        return self

    def table(self, columns: Sequence[str | tuple], rows: Sequence[Sequence[Any]]) -> "Blocks":
        """Add a table; a column is a name or (name, align, format) with align "right" or None."""
        cols = []
        for c in columns:
            name, align, fmt = (c, None, None) if isinstance(c, str) else (tuple(c) + (None, None))[:3]
            cols.append({"name": name, **({"align": align} if align else {}), **({"format": fmt} if fmt else {})})
        if any(len(r) != len(cols) for r in rows):
            raise ValueError(f"every row of a table needs {len(cols)} cells")
        self.blocks.append({"table": {"columns": cols, "rows": [list(r) for r in rows]}})
        return self

    def image(self, alt: str, path: str) -> "Blocks":
        self.blocks.append({"image": {"alt": alt, "path": path}})
        return self

    def tables(self) -> list[dict]:
        return [b["table"] for b in self.blocks if "table" in b]


@dataclass
class Section(Blocks):
    """One section's results: the header fields and the body's blocks (see the module doc)."""

    section: str
    title: str
    command: str
    measured: str = field(default_factory=now)
    machine: dict = field(default_factory=machine)
    notes: list[str] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"section": self.section, "title": self.title, "command": self.command, "measured": self.measured,
                "machine": self.machine, "notes": self.notes, "blocks": self.blocks}

    @classmethod
    def from_json(cls, data: dict) -> "Section":
        return cls(**{k: data[k] for k in ("section", "title", "command", "measured", "machine")},
                   notes=list(data.get("notes", [])), blocks=list(data.get("blocks", [])))


def path_of(name: str, results: Path = RESULTS) -> Path:
    return results / f"{name}.json"


def dumps(obj: Any, depth: int = 0) -> str:
    """JSON with one line per table row, column and machine: readable diffs of re-measured rows."""
    pad = " " * (depth + 1)
    flat = isinstance(obj, (list, dict)) and all(not isinstance(v, (list, dict))
                                                for v in (obj.values() if isinstance(obj, dict) else obj))
    if not isinstance(obj, (list, dict)) or flat:
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return "[\n" + ",\n".join(pad + dumps(v, depth + 1) for v in obj) + "\n" + " " * depth + "]"


def save(section: Section, results: Path = RESULTS) -> Path:
    """Write `section` to its JSON file (atomically)."""
    path = path_of(section.section, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(section.to_json()) + "\n")
    tmp.replace(path)
    return path


def load(name: str, results: Path = RESULTS) -> Section | None:
    """The stored section `name`, or None when it has none."""
    path = path_of(name, results)
    return Section.from_json(json.loads(path.read_text())) if path.exists() else None


def load_all(results: Path = RESULTS) -> list[Section]:
    """Every stored section, in the page's order."""
    sections = [Section.from_json(json.loads(p.read_text())) for p in sorted(results.glob("*.json"))]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(sections, key=lambda s: (rank.get(s.section, len(ORDER)), s.section))


def cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and fmt:
        return format(value, fmt)
    return str(value)


def render_table(table: dict) -> str:
    cols = table["columns"]
    lines = ["| " + " | ".join(c["name"] for c in cols) + " |",
             "|" + "|".join("---:" if c.get("align") == "right" else "---" for c in cols) + "|"]
    for row in table["rows"]:
        lines.append("| " + " | ".join(cell(v, c.get("format")) for v, c in zip(row, cols)) + " |")
    return "\n".join(lines)


def render_block(block: dict) -> str:
    if "text" in block:
        return block["text"]
    if "heading" in block:
        return f"### {block['heading']}"
    if "table" in block:
        return render_table(block["table"])
    if "image" in block:
        return f"![{block['image']['alt']}]({block['image']['path']})"
    raise ValueError(f"unknown block {sorted(block)}")


def render_blocks(blocks: Sequence[dict]) -> str:
    """Blocks as Markdown paragraphs."""
    return "\n\n".join(render_block(b) for b in blocks)


def render_section(section: Section) -> str:
    """One section's Markdown, without its markers."""
    parts = [f"## {section.title}",
             f"Measured {section.measured} on {describe(section.machine)}, by `{section.command}`."]
    parts += [f"Note: {note}" for note in section.notes]
    return "\n\n".join(parts + ([render_blocks(section.blocks)] if section.blocks else []))


def render_doc(results: Path = RESULTS) -> str:
    """docs/benchmarks.md from the JSON files under `results`."""
    out = [HEADER]
    for s in load_all(results):
        out.append(f"<!-- bench:{s.section} -->\n{render_section(s)}\n<!-- /bench:{s.section} -->\n")
    return "\n".join(out)


# what a README cell leaves to the page: a row's "(kept from DATE)" and a cell's "(N steps)"/"(N min)"
_DETAIL = re.compile(r" \((?:kept from [^)]*|≥?[\d.]+ (?:steps|min))\)$")


def _compact(table: dict) -> dict:
    rows = [[_DETAIL.sub("", v) if isinstance(v, str) else v for v in row] for row in table["rows"]]
    return {**table, "rows": rows}


def render_readme_block(results: Path = RESULTS, link: str = "docs/benchmarks.md") -> str:
    """README's results block: for each of README_SECTIONS that is stored, the command that
    measured it, its recipe line (its first text, which names the preset) and its first table,
    without what the page gives beside each figure (dates, steps, minutes) ('' when none is
    stored). The README is the manual: dates stay on the generated page."""
    parts = []
    for name in README_SECTIONS:
        s = load(name, results)
        if s is None or not s.tables():
            continue
        recipe = next((b["text"] for b in s.blocks if "text" in b), "")
        world = "textured" if name.startswith("synthetic-textured") else "standard"  # bench synthetic's names
        recipe = f"**{world.capitalize()} world.** {recipe}" if recipe else recipe
        head = f"Measured by `{s.command}`; [{link}]({link}) gives the date, machine, steps and diagnostics."
        parts += [part for part in (head, recipe, render_table(_compact(s.tables()[0]))) if part]
    return "\n\n".join(parts)


# sections that a page of the manual shows in full, between `<!-- results:NAME:begin -->` and
# `<!-- results:NAME:end -->` (paths from the project's root)
EMBEDS = {"docs/training.md": ("batch-plan",)}


def embed_markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"


def render_embed(name: str, results: Path = RESULTS, link: str = "benchmarks.md") -> str:
    """A section's body for a page of the manual: the command and a link to the dated page, then
    its blocks ('' without that section)."""
    s = load(name, results)
    if s is None:
        return ""
    head = f"Generated by `{s.command}` from the stored results; [{link}]({link}) gives the date and machine."
    return "\n\n".join([head, render_blocks(s.blocks)])


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by `body`, indented
    as the `begin` marker is (so a block inside a list item stays in it)."""
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    indent = head[head.rfind("\n") + 1:]
    indent = indent if not indent.strip() else ""
    lines = "\n".join(indent + line if line else line for line in body.split("\n"))
    return f"{head}{begin}\n{lines}\n{indent}{end}{tail}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def render(results: Path = RESULTS, doc: Path | None = DOC, readme: Path | None = README) -> list[Path]:
    """Render `doc` (and README's results block, when `readme` exists and has the markers) from
    the JSON files under `results`; the paths written."""
    written = []
    if doc is not None:
        _write(doc, render_doc(results))
        written.append(doc)
    if readme is not None and readme.exists():
        text = readme.read_text()
        if README_BEGIN in text and README_END in text:
            link = Path(os.path.relpath(doc or DOC, readme.parent)).as_posix()
            block = render_readme_block(results, link)
            new = replace_between(text, README_BEGIN, README_END, block) if block else text
            if new != text:
                _write(readme, new)
            written.append(readme)
        for page, names in EMBEDS.items():
            path = readme.parent / page
            if not path.exists():
                continue
            text = new = path.read_text()
            for name in names:
                begin, end = embed_markers(name)
                if begin in new and end in new:
                    link = Path(os.path.relpath(doc or DOC, path.parent)).as_posix()
                    block = render_embed(name, results, link)
                    new = replace_between(new, begin, end, block) if block else new
            if new != text:
                _write(path, new)
                written.append(path)
    return written


def record(section: Section, results: Path = RESULTS, doc: Path | None = DOC, readme: Path | None = README) -> Path:
    """Store `section` and render the pages again: what every `ovseg bench NAME` ends with."""
    path = save(section, results)
    render(results, doc, readme)
    return path


def command_line(ctx, skip: tuple[str, ...] = ("results", "doc")) -> str:
    """The command a click/Typer context ran, with the options given on the command line (not
    their defaults, nor the `skip` ones that say only where results go), e.g.
    `ovseg bench train --device cuda --steps 20`, each word quoted for the shell where it needs it
    (a checkpoint named "seed 0=PATH", an override with brackets), so that it can be pasted."""
    import shlex

    words = ["ovseg", *ctx.command_path.split()[1:]]  # the program's name, however it was invoked
    for param in ctx.command.params:
        if param.name in skip:
            continue
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":  # typer may bring its own click: compare by name
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            words += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)
