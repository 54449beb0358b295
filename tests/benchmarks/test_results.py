"""Benchmark results are data: one JSON file per section, docs/benchmarks.md and README's
results block rendered from them (deterministically), never parsed back."""

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typer.testing import CliRunner  # noqa: E402

from ovseg.benchmarks.measure import Measure, describe, machine, median_seconds  # noqa: E402
from ovseg.benchmarks.results import (DOC, README_BEGIN, README_END, RESULTS, Section, load, load_all,  # noqa: E402
                                      render, render_doc, render_section, save)
from ovseg.cli.main import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(width=32, heads=2, depth_before=1, depth_after=0, num_group_tokens=4, num_groups=4,
            n_train=16, n_val=4, batch_size=8)  # a probe that trains in a second


def _section(name: str = "train") -> Section:
    return (Section(name, "Training throughput (`ovseg bench train`)", "ovseg bench train --steps 3",
                    measured="2026-12-01 10:00 UTC", machine={"arch": "x86_64", "logical_cpus": 2, "python": "3.11.7"},
                    notes=["Older than the preset."])
            .text("Steps on random tensors:")
            .table(["preset", ("batch", "right", "d"), ("steps/s", "right", ".2f"), ("peak (GiB)", "right", ".2f"),
                    ("params", "right", ",d")],
                   [["test", 4, 23.678, 0.9, 1234567], ["small", 128, 0.8712, None, 0]])
            .image("a panel", "images/x.png"))


def test_a_section_renders_its_header_notes_and_formatted_cells():
    md = render_section(_section())
    assert md.startswith("## Training throughput (`ovseg bench train`)\n\nMeasured 2026-12-01 10:00 UTC on x86_64, "
                         "2 logical CPUs, Python 3.11.7, by `ovseg bench train --steps 3`.\n\nNote: Older than the preset.")
    assert "| preset | batch | steps/s | peak (GiB) | params |\n|---|---:|---:|---:|---:|" in md
    assert "| test | 4 | 23.68 | 0.90 | 1,234,567 |" in md and "| small | 128 | 0.87 |  | 0 |" in md
    assert md.endswith("![a panel](images/x.png)")


def test_rendering_is_deterministic_and_survives_a_json_round_trip(tmp_path):
    save(_section("train"), tmp_path / "a")
    save(_section("download"), tmp_path / "a")
    save(_section("zzz-new"), tmp_path / "a")
    first = render_doc(tmp_path / "a")
    assert first == render_doc(tmp_path / "a")
    # the same sections saved in another order give the same page: the order is the page's, not the disk's
    for name in ("zzz-new", "download", "train"):
        save(load(name, tmp_path / "a"), tmp_path / "b")
    assert render_doc(tmp_path / "b") == first
    assert first.index("bench:download") < first.index("bench:train") < first.index("bench:zzz-new")
    assert load("train", tmp_path / "a").to_json() == _section("train").to_json()
    assert json.loads((tmp_path / "a" / "train.json").read_text())["command"] == "ovseg bench train --steps 3"


def test_the_committed_page_is_what_the_committed_results_render():
    """docs/benchmarks.md is generated: editing it by hand, or a result without its page, fails."""
    assert (ROOT / DOC).read_text() == render_doc(ROOT / RESULTS)
    sections = load_all(ROOT / RESULTS)
    assert {s.section for s in sections} >= {"download", "curate", "train", "model", "eval", "synthetic"}
    assert all(s.command.startswith("ovseg bench ") and s.measured.endswith(" UTC") and s.machine for s in sections)


def test_readme_results_block_is_rendered_from_the_results_and_nothing_else(tmp_path):
    save(Section("synthetic", "Quality", "ovseg bench synthetic", measured="2026-12-05 01:27 UTC", machine={"arch": "x86_64"})
         .text("intro").table(["variant", ("5 min", "right")], [["+ entity", "15.6 ± 1.6 [87.8] (660 steps)"],
                                                               ["contrastive (kept from 2026-12-03 20:35 UTC)", "1.0 (≥3.5 min)"]]),
         tmp_path / "results")
    readme = tmp_path / "README.md"
    before = f"# x\n\n- item\n\n  {README_BEGIN}\n  old table\n  {README_END}\n\nafter\n"
    readme.write_text(before)
    render(tmp_path / "results", tmp_path / "docs" / "benchmarks.md", readme)
    text = readme.read_text()
    assert "| contrastive | 1.0 |" in text
    assert "old table" not in text and text.startswith("# x\n\n- item\n\n") and text.endswith("\n\nafter\n")
    assert "  | + entity | 15.6 ± 1.6 [87.8] |" in text  # indented as the marker: inside the list item
    assert "[docs/benchmarks.md](docs/benchmarks.md)" in text and "2026" not in text  # dates stay on the page
    render(tmp_path / "results", tmp_path / "docs" / "benchmarks.md", readme)
    assert readme.read_text() == text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    render(tmp_path / "results", tmp_path / "docs" / "benchmarks.md", plain)
    assert plain.read_text() == "no markers\n"


def test_the_project_readme_block_is_the_rendered_one():
    text = (ROOT / "README.md").read_text()
    assert README_BEGIN in text and README_END in text
    copy = text
    from ovseg.benchmarks.results import render_readme_block, replace_between

    assert replace_between(copy, README_BEGIN, README_END, render_readme_block(ROOT / RESULTS)) == text


def test_the_readme_block_names_each_sections_world(tmp_path):
    from ovseg.benchmarks.results import render_readme_block

    for name in ("synthetic", "synthetic-textured-synthetic-small"):
        save(Section(name, "Quality", f"ovseg bench synthetic --out {name}").text("Recipe: preset `synthetic-small`.")
             .table(["variant", ("100 steps", "right")], [["+ mask (full)", "1.0 ± 0.0 [2.0] (0.5 min)"]]), tmp_path)
    block = render_readme_block(tmp_path)
    standard, textured = block.split("Measured by")[1:]
    assert "**Standard world.** Recipe: preset `synthetic-small`." in standard
    assert "**Textured world.** Recipe: preset `synthetic-small`." in textured
    assert "(0.5 min)" not in block  # the minutes stay on the generated page


def test_a_bench_command_writes_its_json_and_renders_the_page_from_every_section(tmp_path, monkeypatch):
    """The cheapest bench (a two-step grouping probe) stores its section and renders the whole
    page again; a page edited by hand is overwritten, not read."""
    import ovseg.benchmarks.grouping_probe as probe

    original = probe.ProbeConfig
    monkeypatch.setattr(probe, "ProbeConfig", lambda **kw: original(**{**kw, **TINY}))
    results, doc = tmp_path / "results", tmp_path / "benchmarks.md"
    save(_section("train"), results)
    doc.write_text("hand-written text that nothing reads\n")
    result = CliRunner().invoke(app, ["bench", "grouping-probe", "--steps", "2", "--depths", "1+0",
                                      "--results", str(results), "--doc", str(doc)])
    assert result.exit_code == 0, result.output
    stored = json.loads((results / "grouping-probe-learned-hard.json").read_text())
    assert stored["command"] == "ovseg bench grouping-probe --steps 2 --depths 1+0"  # what was measured, not where it went
    assert stored["machine"]["logical_cpus"] == os.cpu_count() and "torch" in stored["machine"]
    table = next(b["table"] for b in stored["blocks"] if "table" in b)
    assert table["rows"][0][:7] == ["standard", "learned", "hard (Gumbel)", "image", "1 + 0", 0, "2 (8)"]
    assert doc.read_text() == render_doc(results)
    assert "hand-written" not in doc.read_text() and "<!-- bench:train -->" in doc.read_text()


def test_nothing_parses_the_rendered_page_back():
    """Only the renderer knows the page's section markers; no module reads the page."""
    sources = [p for folder in ("benchmarks", "cli") for p in sorted((ROOT / folder).rglob("*.py"))]
    with_markers = [p.relative_to(ROOT).as_posix() for p in sources if "<!-- bench:" in p.read_text()]
    assert with_markers == ["benchmarks/results.py"]
    assert not [p for p in sources if "def read_section" in p.read_text() or "def write_section" in p.read_text()]


def test_measure_times_its_body_and_describes_the_machine():
    with Measure() as m:
        time.sleep(0.05)
    assert 0.05 <= m.seconds < 1 and m.cpu_seconds < m.seconds and m.peak_mib >= m.start_mib > 0
    assert median_seconds(lambda: time.sleep(0.01), repeats=3, warmup=0) >= 0.01
    got = machine()
    assert got["logical_cpus"] == os.cpu_count() and got["cpu"]
    assert describe({"arch": "x86_64", "logical_cpus": 2, "python": "3.11.7"}) == "x86_64, 2 logical CPUs, Python 3.11.7"
    assert describe({"arch": "x86_64", "cpu": "EPYC", "logical_cpus": 16, "torch_threads": 8, "torch": "2.9",
                     "gpu": "H100"}) == "x86_64 (EPYC), 16 logical CPUs, 8 torch threads, torch 2.9, GPU H100"


def test_the_training_page_shows_the_batch_plan_section_as_rendered():
    from ovseg.benchmarks.results import embed_markers, render_embed

    begin, end = embed_markers("batch-plan")
    text = (ROOT / "docs" / "training.md").read_text()
    shown = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == render_embed("batch-plan", RESULTS, "benchmarks.md").strip()
    assert "| 2,048 (OVSegmentor stage 1) | 30 | 8 | 80 | 256 | 256 | 1 |" in shown


def test_the_recorded_command_can_be_pasted_into_a_shell():
    """A checkpoint named "seed 0=PATH" or an override with brackets was recorded bare, and the
    command a section showed did not run as written."""
    import shlex
    from typing import List

    import typer

    from ovseg.benchmarks.results import command_line

    demo = typer.Typer()
    seen = {}

    @demo.command()
    def run(ctx: typer.Context, items: List[str] = typer.Argument(...), steps: int = typer.Option(5, "--steps"),
            quiet: bool = typer.Option(False, "--quiet")):
        seen["command"] = command_line(ctx)

    args = ["seed 0=/runs/a b/last.pt", "train.stages.1.losses=[contrastive,entity]", "--steps", "7"]
    assert CliRunner().invoke(demo, args).exit_code == 0
    words = shlex.split(seen["command"])
    assert words[1:] == args  # --quiet at its default is left out
    assert "'seed 0=/runs/a b/last.pt'" in seen["command"]
