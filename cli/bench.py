"""`ovseg bench ...`: speed, memory and quality benchmarks.

Each benchmark is a library function that measures and returns Markdown; this module writes
that Markdown into its own section of docs/benchmarks.md (between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->`), so every number there was written by a run, never by hand.
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Benchmarks; each writes its results into docs/benchmarks.md.", no_args_is_help=True)

DEFAULT_DOC = Path("docs/benchmarks.md")
DEFAULT_STEPS = "1000,2000"  # `ovseg bench synthetic`'s step budgets
_HEADER = "# Benchmarks\n\nEvery section below is written by `ovseg bench NAME`; rerun it to refresh.\n"


def machine_line() -> str:
    """One line naming the machine a result was measured on."""
    import os

    return (
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, Python {platform.python_version()}."
    )


def _markers(name: str) -> tuple[str, str]:
    """The comments that open and close the section `name` of the benchmarks document."""
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(name: str, markdown: str, doc: Path = DEFAULT_DOC) -> Path:
    """Replace (or append) the section `name` of the benchmarks document with `markdown`."""
    start, end = _markers(name)
    text = doc.read_text() if doc.exists() else _HEADER
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    return doc


def read_section(name: str, doc: Path = DEFAULT_DOC) -> str | None:
    """The body of the section `name` of the benchmarks document, or None when it has none."""
    start, end = _markers(name)
    text = doc.read_text() if doc.exists() else ""
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0]


@app.command("download")
def bench_download(
    images: int = typer.Option(3000, "--images", help="Synthetic images to serve and download."),
    processes: int = typer.Option(2, "--processes", help="img2dataset processes."),
    threads: int = typer.Option(32, "--threads", help="img2dataset threads per process."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Images per tar shard."),
    repeats: int = typer.Option(2, "--repeats", help="Runs of each way (alternating); the median is reported."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
) -> None:
    """Images/s from the loopback server: `ovseg curate download` against plain img2dataset."""
    from ovseg.benchmarks.download import benchmark_download

    md, numbers = benchmark_download(n_images=images, processes=processes, threads=threads,
                                     shard_size=shard_size, repeats=repeats, machine=machine_line())
    write_section("download", md, doc)
    typer.echo(md)


@app.command("model")
def bench_model(
    presets: str = typer.Option("test,synthetic-small", "--presets", help="Comma-separated CPU presets to time."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per training step for the CPU presets."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs of each measurement (the median is reported)."),
    paper_batch: int = typer.Option(2, "--paper-batch", help="Images per step for the paper-preset encoder timing."),
    paper_repeats: int = typer.Option(3, "--paper-repeats", help="Timed runs of the paper-preset encoders."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda to measure on a GPU."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: up to 4, the machine's CPUs)."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
) -> None:
    """Model cost: training-step time and memory of the CPU presets, the grouping image encoder
    against a plain timm ViT, and the paper preset's FLOPs and parameters."""
    from ovseg.benchmarks.model import benchmark_model

    from ovseg.training.presets import list_presets

    names = tuple(p.strip() for p in presets.split(",") if p.strip())
    unknown = [n for n in names if n not in list_presets()]
    if unknown or not names:
        raise typer.BadParameter(f"unknown presets {unknown}; available: {', '.join(list_presets())}",
                                 param_hint="--presets")
    md, _ = benchmark_model(names, batch_size=batch_size, repeats=repeats, paper_batch=paper_batch,
                            paper_repeats=paper_repeats, device=device, threads=threads or None,
                            machine=machine_line())
    # one section per kind of device, so CPU and GPU results stand side by side
    kind = device.split(":")[0]
    name, title = ("model", "") if kind == "cpu" else (f"model-{kind}", f", {kind.upper()}")
    write_section(name, f"## Model cost{title} (`ovseg bench model --device {device}`)\n\n" + md, doc)
    typer.echo(md)


@app.command("eval")
def bench_eval(
    presets: str = typer.Option("test,synthetic-small", "--presets", help="Comma-separated presets to time (random weights)."),
    protocols: str = typer.Option("paper,training-free", "--protocols", help="Comma-separated protocols for the VOC-sized images (paper, training-free)."),
    images: int = typer.Option(16, "--images", help="VOC-sized (500x375) images evaluated at each protocol."),
    synthetic_images: int = typer.Option(128, "--synthetic-images", help="64 px images evaluated at the synthetic world's protocol."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda to measure on a GPU (bf16 autocast)."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
) -> None:
    """Evaluation speed: images/s of the whole `ovseg eval` loop at the paper's and the
    training-free protocols and at the synthetic world's, per preset."""
    from ovseg.benchmarks.eval import benchmark_eval
    from ovseg.evaluation.segmenter import PROTOCOLS
    from ovseg.training.presets import list_presets

    names = tuple(p.strip() for p in presets.split(",") if p.strip())
    unknown = [n for n in names if n not in list_presets()]
    if unknown or not names:
        raise typer.BadParameter(f"unknown presets {unknown}; available: {', '.join(list_presets())}",
                                 param_hint="--presets")
    chosen = tuple(p.strip() for p in protocols.split(",") if p.strip())
    if not chosen or any(p not in PROTOCOLS for p in chosen):
        raise typer.BadParameter(f"choose from {', '.join(PROTOCOLS)}", param_hint="--protocols")
    md, _ = benchmark_eval(names, protocols=chosen, n_images=images, synthetic_images=synthetic_images, batch_size=batch_size,
                           device=device, threads=threads or None, machine=machine_line())
    section = "eval" if device == "cpu" else f"eval-{device.split(':')[0]}"
    title = "## Evaluation speed (`ovseg bench eval`)" + ("" if device == "cpu" else f" on {device}")
    write_section(section, title + "\n\n" + md, doc)
    typer.echo(md)


@app.command("synthetic")
def bench_synthetic(
    out: Path = typer.Option(Path("bench-synthetic"), "--out", help="Folder for the world, data, runs and logs."),
    steps: str = typer.Option("", help=f"Comma-separated training budgets in steps (at the preset's batch size, stated in the table) \\[default: {DEFAULT_STEPS}]: one run per budget, variant and seed on the preset's schedule over those steps; each cell also gives the minutes its training took."),
    minutes: str = typer.Option("", help="Comma-separated wall-clock budgets in minutes instead of --steps, for exploring (they measure the machine as much as the method): one run per variant and seed, evaluated when it has trained each budget."),
    style: str = typer.Option("standard", help="The synthetic world's style: standard or textured (ovseg curate synthetic --style)."),
    seeds: str = typer.Option("0,1", help="Comma-separated seeds."),
    threads: int = typer.Option(2, help="CPU threads per training run."),
    parallel: int = typer.Option(1, help="Runs at a time (each pinned to its own cores when there are enough)."),
    device: str = typer.Option("cpu", help="cpu, or cuda to train on a GPU."),
    n_train: int = typer.Option(6000, help="Training images in the synthetic world."),
    variants: str = typer.Option("all", help="Comma-separated variants (contrastive, entity, full) or all."),
    doc: Path = typer.Option(Path("docs/benchmarks.md"), help="Markdown file to write the results into."),
    preset: str = typer.Option("synthetic-small", help="Training preset of every run (the recipe under test)."),
    keep_rows: str = typer.Option("", help="Comma-separated variants not rerun whose rows (and diagnostics) in --doc's section stand as they are, each marked with the date of that section: only for a change that cannot touch their training, e.g. a stage-2 setting leaves contrastive and entity as they were."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides for every run, key.sub=value (the stage-1/2 losses are the variants')."),
) -> None:
    """Quality: each proxy task's contribution at equal training on the synthetic world.

    Each variant and seed trains the preset (with the overrides) to each step budget (or, with
    --minutes, for each wall-clock budget) and is evaluated on the test split, threshold chosen
    on val. Rows name their model (grouping, stem, losses). Rerunning skips what is done: a
    finished budget is read back, an interrupted run resumes."""
    import json
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from ovseg.benchmarks.synthetic import check_recipe, kept_rows, report, run_parallel
    from ovseg.cli.pipeline import Stopwatch, prepare_synthetic_data
    from ovseg.curation.synthetic import WorldConfig
    from ovseg.training.config import ConfigError, resolve

    names = {"contrastive": "contrastive", "entity": "+ entity", "full": "+ mask (full)"}
    asked = list(names) if variants == "all" else [v.strip() for v in variants.split(",")]
    unknown = [v for v in asked if v not in names]
    if unknown:
        raise typer.BadParameter(f"unknown variants {unknown}; known: {', '.join(names)}, all", param_hint="--variants")
    chosen = [names[v] for v in asked]
    keep = [v.strip() for v in keep_rows.split(",") if v.strip()]
    if any(v not in names for v in keep) or set(keep) & set(asked):
        raise typer.BadParameter(f"takes variants ({', '.join(names)}) that --variants does not run, not {keep_rows}",
                                 param_hint="--keep-rows")
    if steps and minutes:
        raise typer.BadParameter("give budgets in --steps or in --minutes, not both", param_hint="--steps")
    if style not in ("standard", "textured"):
        raise typer.BadParameter(f"takes standard or textured, not {style!r}", param_hint="--style")
    unit = "min" if minutes else "steps"
    try:
        if unit == "steps":
            budgets = sorted(int(m) for m in (steps or DEFAULT_STEPS).split(","))
            if min(budgets) < 1:
                raise ValueError("a budget must be at least one step")
        else:
            budgets = sorted(float(m) for m in minutes.split(","))
        seed_list = [int(x) for x in seeds.split(",")]
    except ValueError as error:
        raise typer.BadParameter(f"--steps (whole numbers), --minutes and --seeds take comma-separated numbers: {error}") from None
    # one section per world and recipe family: the default one keeps its old name
    section = "synthetic" if (preset, style) == ("synthetic-small", "standard") else f"synthetic-{style}-{preset}"
    kept = None
    if keep:
        try:
            kept = kept_rows(read_section(section, doc) or "", [names[v] for v in keep])
            if kept["unit"] != unit:
                raise ValueError(f"its budgets are in {kept['unit']}, these in {unit}")
        except ValueError as error:
            typer.echo(f"ovseg bench synthetic: cannot keep rows of {doc}: {error}", err=True)
            raise typer.Exit(2)
    recipe = {"preset": preset, "overrides": list(overrides or ()), "style": style}
    try:
        resolve(preset, overrides=recipe["overrides"])
        check_recipe(out, recipe)
    except ConfigError as error:
        typer.echo(f"ovseg bench synthetic: {error}", err=True)
        raise typer.Exit(2)
    world_cfg = WorldConfig(n_train=n_train, n_val=100, n_test=300, style=style)
    prepared = prepare_synthetic_data(out, world_cfg, 2, Stopwatch(typer.echo))
    # step-budget jobs log apart from wall-clock ones: a folder may hold both
    suffix = "-steps" if unit == "steps" else ""
    jobs = [{"name": f"{v.split()[-1].strip('()')}-seed{s}{suffix}", "variant": v, "budgets": budgets, "seed": s,
             "unit": unit, "data": str(prepared["data"]), "world": str(prepared["world"]), "device": device,
             "threads": threads, "run": str(out / "runs" / f"{v.split()[-1].strip('()')}-seed{s}"),
             "preset": preset, "overrides": recipe["overrides"]}
            for v in chosen for s in seed_list]
    results = run_parallel(jobs, threads, parallel, out / "logs")
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    md = report(out, prepared["world"], results, threads, machine_line(), images=doc.parent / "images", kept=kept,
                preset=preset, overrides=recipe["overrides"], style=style, section=section)
    world = "" if style == "standard" else f", {style} style"
    title = f"## Quality on the synthetic world{world}, preset `{preset}` (`ovseg bench synthetic`)"
    if section == "synthetic":
        title = "## Quality on the synthetic world (`ovseg bench synthetic`)"
    write_section(section, title + "\n\n" + md, doc)
    typer.echo(md)


@app.command("grouping-probe")
def bench_grouping_probe(
    steps: int = typer.Option(1000, "--steps", min=1, help="Training steps of each probe (batch 64)."),
    n_train: int = typer.Option(2000, "--n-train", min=64, help="Training images drawn from the world."),
    depths: str = typer.Option("2+2,1+1", "--depths", help="Comma-separated blocks before + after the grouping, one probe each."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    grouping: str = typer.Option("learned", "--grouping", help="learned (GroupViT's assignment) or cluster (ovseg's k-means)."),
    hard: bool = typer.Option(True, "--hard/--soft", help="Learned grouping: Gumbel straight-through one-hot in training (the official) or the plain softmax."),
    style: str = typer.Option("standard", "--style", help="The synthetic world's style: standard or textured."),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Also score val every this many steps (0: before and after only)."),
    target: str = typer.Option("image", "--target", help="image (which shapes the image holds: a caption's weak label) or pixels (each pixel's class through its group: can the grouping draw the masks)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
):
    """Does the grouping keep several groups per image when trained on the true labels? A
    supervised probe on the synthetic world (no text): groups per val image and group-majority
    mIoU, before and after training."""
    import torch

    from ovseg.benchmarks.grouping_probe import ProbeConfig, curve_table, probe_table, run_probe

    if style not in ("standard", "textured"):
        raise typer.BadParameter(f"takes standard or textured, not {style!r}", param_hint="--style")
    if target not in ("image", "pixels"):
        raise typer.BadParameter(f"takes image or pixels, not {target!r}", param_hint="--target")
    torch.set_num_threads(threads)
    rows = []
    for depth in depths.split(","):
        before, after = (int(v) for v in depth.split("+"))
        for seed in (int(v) for v in seeds.split(",")):
            cfg = ProbeConfig(grouping=grouping, hard_assignment=hard, depth_before=before, depth_after=after,
                              steps=steps, seed=seed, style=style, eval_every=eval_every, target=target,
                              n_train=n_train)
            result = run_probe(cfg)
            typer.echo(f"{grouping} {depth} seed {seed}: {result}")
            rows.append((grouping, cfg, result))
    world = "" if style == "standard" else f", {style} world"
    md = (f"## Supervised grouping probe{world} (`ovseg bench grouping-probe`)\n\n{machine_line()} {threads} thread(s); "
          f"{rows[0][1].n_train:,} training images, {rows[0][1].n_val} val images.\n\n"
          + probe_table(rows) + "\n" + (curve_table(rows) + "\n" if eval_every else ""))
    write_section(f"grouping-probe-{grouping}-{'hard' if hard else 'soft'}" + ("" if target == "image" else f"-{target}")
                  + ("" if style == "standard" else f"-{style}"), md, doc)
    typer.echo(md)


@app.command("world")
def bench_world(
    out: Path = typer.Option(Path("bench-world"), "--out", help="Folder for the worlds and the random models."),
    styles: str = typer.Option("standard,textured", "--styles", help="Comma-separated world styles."),
    presets: str = typer.Option("synthetic-small,synthetic-paper", "--presets", help="Comma-separated presets (random init)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random models."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
) -> None:
    """How much a random model's grouping already segments each world style: the group-majority
    mIoU of untrained presets (what the world gives away), beside chance and the grid ceiling."""
    import torch

    from ovseg.benchmarks.world_difficulty import difficulty_table, world_difficulty
    from ovseg.training.presets import list_presets

    chosen_styles = tuple(s.strip() for s in styles.split(",") if s.strip())
    if not chosen_styles or any(s not in ("standard", "textured") for s in chosen_styles):
        raise typer.BadParameter(f"takes standard and/or textured, not {styles!r}", param_hint="--styles")
    names = tuple(p.strip() for p in presets.split(",") if p.strip())
    unknown = [n for n in names if n not in list_presets()]
    if unknown or not names:
        raise typer.BadParameter(f"unknown presets {unknown}; available: {', '.join(list_presets())}",
                                 param_hint="--presets")
    torch.set_num_threads(threads)
    rows = world_difficulty(out, chosen_styles, names, seed)
    md = (f"## What an untrained grouping gives on each world (`ovseg bench world`)\n\n{machine_line()}\n\n"
          "Random-init models on the test split (300 images; threshold chosen on val): chance mIoU, the group-majority "
          "mIoU (each group given the majority true label of its pixels: what the grouping alone allows) and the "
          "ceiling of the grid the groups are drawn on.\n\n" + difficulty_table(rows) + "\n")
    write_section("world", md, doc)
    typer.echo(md)


@app.command("mask-targets")
def bench_mask_targets(
    checkpoints: List[str] = typer.Argument(..., help="Checkpoints to measure, each NAME=PATH or PATH (named by its file)."),
    out: Path = typer.Option(Path("bench-synthetic"), "--out", help="The `ovseg bench synthetic` folder whose world and cross-image pairs are read."),
    pairs: int = typer.Option(512, "--pairs", min=1, help="Pairs measured (each in both directions)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pairs' draw."),
    threads: int = typer.Option(2, "--threads", help="torch threads."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
) -> None:
    """What the mask-consistency loss trains on: for pairs of synthetic training images that
    share a class, how much of each kept group and of the target it is matched to lies on the
    shared object, under each checkpoint's own loss settings and under the paper's form of the
    loss (dice matching on the assignment grid, 4 groups kept)."""
    import torch

    from ovseg.benchmarks.mask_targets import mask_target_quality, report, synthetic_pairs
    from ovseg.training.checkpoint import load_model

    named = {}
    for item in checkpoints:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(path)
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="CHECKPOINTS")
        named[name or path.name] = path
    torch.set_num_threads(threads)
    results = {}
    for name, path in named.items():
        model = load_model(path)
        try:
            results[name] = mask_target_quality(model, synthetic_pairs(out, pairs, seed))
        except (FileNotFoundError, TypeError, ValueError) as error:
            typer.echo(f"ovseg bench mask-targets: {error}", err=True)
            raise typer.Exit(2)
    md = "## What the mask loss trains on (`ovseg bench mask-targets`)\n\n" + report(results, machine_line())
    write_section("mask-targets", md, doc)
    typer.echo(md)


@app.command("train")
def bench_train(
    presets: str = typer.Option("test,synthetic-small", "--presets", "--preset", help="Comma-separated presets to time (hub-initialised ones, like paper, run with random weights of the same shape)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size \\[default: the preset's]."),
    steps: int = typer.Option(10, help="Timed steps per preset."),
    loader: bool = typer.Option(True, help="Also measure loader throughput per core."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides for every preset, key.sub=value."),
    doc: Path = typer.Option(DEFAULT_DOC, help="Markdown file to write the results into."),
) -> None:
    """Loader samples/s per core and training steps/s (and peak memory) of presets."""
    from ovseg.benchmarks.train import loader_throughput, report, train_throughput

    load = loader_throughput() if loader else None
    runs = [(p, device, train_throughput(p, device, batch_size, steps, overrides=tuple(overrides or ())))
            for p in presets.split(",")]
    section = "train-cuda" if device.startswith("cuda") else "train"
    md = f"## Training throughput (`ovseg bench train --device {device}`)\n\n{machine_line()}\n\n" + report(load, runs)
    write_section(section, md, doc)
    typer.echo(md)


@app.command("curate")
def bench_curate(
    rows: int = typer.Option(12_423_374, "--rows", help="Generated parsed rows for select..pairs (CC12M has 12,423,374)."),
    parse_captions: int = typer.Option(2000, "--parse-captions", help="Captions parsed by each pipeline for captions/s."),
    threads: int = typer.Option(2, "--threads", help="DuckDB threads for select..pairs (the target is for 2)."),
    memory_limit: str = typer.Option("3GB", "--memory-limit", help="DuckDB memory_limit for select..pairs."),
    cores: int = typer.Option(16, "--cores", help="Cores of the machine the whole-CC12M time is extrapolated to."),
    doc: Path = typer.Option(DEFAULT_DOC, "--doc", help="Markdown file to write the section into."),
) -> None:
    """Curation speed: parse captions/s against spaCy's full pipeline, select..pairs time and peak memory, CC12M extrapolation."""
    from ovseg.benchmarks.curate import benchmark_curate

    md, _ = benchmark_curate(rows=rows, parse_captions=parse_captions, threads=threads, memory_limit=memory_limit,
                             cores=cores, machine=machine_line())
    write_section("curate", md, doc)
    typer.echo(md)
