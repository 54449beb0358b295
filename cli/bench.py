"""`ovseg bench ...`: speed, memory and quality benchmarks (Typer wrappers of `ovseg.benchmarks`).

Each command runs a benchmark, stores its section as JSON under `--results` (one file per
section, `ovseg.benchmarks.results`) and renders docs/benchmarks.md (`--doc`) again from all of
them; `ovseg bench render` only renders. Nothing reads the rendered page back.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ovseg.benchmarks.results import DOC, README, RESULTS

app = typer.Typer(help="Benchmarks; each stores its results as JSON and renders docs/benchmarks.md from them.",
                  no_args_is_help=True)

DEFAULT_STEPS = "1000,2000"  # `ovseg bench synthetic`'s step budgets
RESULTS_HELP = "Folder of the JSON results, one file per section."
DOC_HELP = "Markdown page rendered from the results."


def _record(section, results: Path, doc: Path) -> None:
    """Store `section`, render the page (and README's results block when the results are the
    project's own), and print the section."""
    from ovseg.benchmarks.results import record, render_section

    own = results.resolve() == RESULTS.resolve()
    record(section, results, doc, README if own else None)
    typer.echo(render_section(section))


def _command(ctx: typer.Context) -> str:
    from ovseg.benchmarks.results import command_line

    return command_line(ctx)


def _is_name(text: str) -> bool:
    """Whether `text` may name a results section (bench synthetic's --label, the --tag of the
    others): letters, digits and dashes, so that it is a file name and a Markdown anchor."""
    return text.replace("-", "").isalnum()


def _named_checkpoints(items: List[str], by) -> dict[str, Path]:
    """CHECKPOINTS arguments, each NAME=PATH or PATH (named `by(PATH)`), as {name: path}; a
    path that is not a file stops the command with a usage error."""
    named = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if not Path(path).is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="CHECKPOINTS")
        named[name or by(Path(path))] = Path(path)
    return named


def _presets(presets: str) -> tuple[str, ...]:
    from ovseg.training.presets import list_presets

    names = tuple(p.strip() for p in presets.split(",") if p.strip())
    unknown = [n for n in names if n not in list_presets()]
    if unknown or not names:
        raise typer.BadParameter(f"unknown presets {unknown}; available: {', '.join(list_presets())}",
                                 param_hint="--presets")
    return names


@app.command("render")
def bench_render(
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
    readme: Optional[Path] = typer.Option(README, "--readme", help="README whose results block is rendered too (skipped when it has no markers)."),
) -> None:
    """Render docs/benchmarks.md (and README's results block) from the stored JSON results."""
    from ovseg.benchmarks.results import render

    if not results.is_dir():
        typer.echo(f"ovseg bench render: {results} is not a folder of results", err=True)
        raise typer.Exit(2)
    for path in render(results, doc, readme):
        typer.echo(f"rendered {path}")


@app.command("download")
def bench_download(
    ctx: typer.Context,
    images: int = typer.Option(3000, "--images", help="Synthetic images to serve and download."),
    processes: int = typer.Option(2, "--processes", help="img2dataset processes."),
    threads: int = typer.Option(32, "--threads", help="img2dataset threads per process."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Images per tar shard."),
    repeats: int = typer.Option(2, "--repeats", help="Runs of each way (alternating); the median is reported."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """Images/s from the loopback server: `ovseg curate download` against plain img2dataset."""
    from ovseg.benchmarks.download import benchmark_download

    section, _ = benchmark_download(n_images=images, processes=processes, threads=threads, shard_size=shard_size,
                                    repeats=repeats, command=_command(ctx))
    _record(section, results, doc)


@app.command("model")
def bench_model(
    ctx: typer.Context,
    presets: str = typer.Option("test,synthetic-small", "--presets", help="Comma-separated CPU presets to time."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per training step for the CPU presets."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs of each measurement (the median is reported)."),
    paper_batch: int = typer.Option(2, "--paper-batch", help="Images per step for the paper-preset encoder timing."),
    paper_repeats: int = typer.Option(3, "--paper-repeats", help="Timed runs of the paper-preset encoders."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda to measure on a GPU."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: up to 4, the machine's CPUs)."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """Model cost: training-step time and memory of the CPU presets, the grouping image encoder
    against a plain timm ViT, and the paper preset's FLOPs and parameters."""
    from ovseg.benchmarks.model import benchmark_model

    section, _ = benchmark_model(_presets(presets), batch_size=batch_size, repeats=repeats, paper_batch=paper_batch,
                                 paper_repeats=paper_repeats, device=device, threads=threads or None,
                                 command=_command(ctx))
    _record(section, results, doc)


@app.command("eval")
def bench_eval(
    ctx: typer.Context,
    presets: str = typer.Option("test,synthetic-small", "--presets", help="Comma-separated presets to time (random weights)."),
    protocols: str = typer.Option("paper,training-free", "--protocols", help="Comma-separated protocols for the VOC-sized images (paper, training-free)."),
    images: int = typer.Option(16, "--images", help="VOC-sized (500x375) images evaluated at each protocol."),
    synthetic_images: int = typer.Option(128, "--synthetic-images", help="64 px images evaluated at the synthetic world's protocol."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda to measure on a GPU (bf16 autocast)."),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """Evaluation speed: images/s of the whole `ovseg eval` loop at the paper's and the
    training-free protocols and at the synthetic world's, per preset."""
    from ovseg.benchmarks.eval import benchmark_eval
    from ovseg.evaluation.segmenter import PROTOCOLS

    names = _presets(presets)
    chosen = tuple(p.strip() for p in protocols.split(",") if p.strip())
    if not chosen or any(p not in PROTOCOLS for p in chosen):
        raise typer.BadParameter(f"choose from {', '.join(PROTOCOLS)}", param_hint="--protocols")
    section, _ = benchmark_eval(names, protocols=chosen, n_images=images, synthetic_images=synthetic_images,
                                batch_size=batch_size, device=device, threads=threads or None, command=_command(ctx))
    _record(section, results, doc)


@app.command("synthetic")
def bench_synthetic(
    ctx: typer.Context,
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
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP + " Pictures go to the images/ folder beside it."),
    preset: str = typer.Option("synthetic-small", help="Training preset of every run (the recipe under test)."),
    label: str = typer.Option("", help="Name of a recipe changed by overrides: its results section is synthetic-STYLE-PRESET-LABEL, so that it does not overwrite the preset's own. Required with overrides."),
    keep_rows: str = typer.Option("", help="Comma-separated variants not rerun whose rows (and diagnostics) in the stored section stand as they are, each marked with the date of that section: only for a change that cannot touch their training, e.g. a stage-2 setting leaves contrastive and entity as they were."),
    drop_rows: bool = typer.Option(False, "--drop-rows", help="Write the section with only the variants, budgets and seeds this call runs, dropping the stored measurements of the others (without it, a call that would drop a measured row, budget or seed stops and says which)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides for every run, key.sub=value (the stage-1/2 losses are the variants')."),
) -> None:
    """Quality: each proxy task's contribution at equal training on the synthetic world.

    Each variant and seed trains the preset (with the overrides) to each step budget (or, with
    --minutes, for each wall-clock budget) and is evaluated on the test split, threshold chosen
    on val. Rows name their model (grouping, stem, losses). Rerunning skips what is done: a
    finished budget is read back, an interrupted run resumes."""
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from ovseg.benchmarks.results import load
    from ovseg.benchmarks.synthetic import (VARIANT_NAMES, benchmark_synthetic, check_recipe, dropped_cells,
                                            kept_rows, measured_variants, section_name)
    from ovseg.cli.pipeline import Stopwatch, prepare_synthetic_data
    from ovseg.curation.synthetic import WorldConfig
    from ovseg.training.config import ConfigError, resolve

    names = VARIANT_NAMES
    asked = list(names) if variants == "all" else [v.strip() for v in variants.split(",")]
    unknown = [v for v in asked if v not in names]
    if unknown:
        raise typer.BadParameter(f"unknown variants {unknown}; known: {', '.join(names)}, all", param_hint="--variants")
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
    recipe = {"preset": preset, "overrides": list(overrides or ()), "style": style}
    try:
        resolve(preset, overrides=recipe["overrides"])
        if overrides and not label:
            raise ConfigError("a recipe changed by overrides needs a name for its results section (--label NAME), "
                              "or it would overwrite the preset's")
        if label and not _is_name(label):
            raise ConfigError(f"--label takes letters, digits and dashes, not {label!r}")
        check_recipe(out, recipe)
    except ConfigError as error:
        typer.echo(f"ovseg bench synthetic: {error}", err=True)
        raise typer.Exit(2)
    section = section_name(preset, style, label)
    stored = load(section, results)
    by_row = {row: name for name, row in names.items()}
    dropped = [v for v in measured_variants(stored) if by_row[v] not in asked + keep] if stored else []
    if dropped and not drop_rows:
        flags = ",".join(by_row[v] for v in dropped)
        typer.echo(f"ovseg bench synthetic: section {section} in {results} holds measured rows of {', '.join(dropped)} "
                   f"that this call does not run: --keep-rows {flags} keeps them (for a change that cannot touch "
                   f"their training), --variants adds them to the runs, --drop-rows drops them", err=True)
        raise typer.Exit(2)
    lost = dropped_cells(stored, [names[v] for v in asked], budgets, seed_list) if stored else []
    if lost and not drop_rows:
        typer.echo(f"ovseg bench synthetic: section {section} in {results} holds measurements that this call would "
                   f"drop ({', '.join(lost)}): give their budgets to --steps/--minutes and their seeds to --seeds "
                   f"(finished runs are read back, not retrained), or --drop-rows to drop them", err=True)
        raise typer.Exit(2)
    kept = None
    if keep:
        try:
            if stored is None:
                raise ValueError("it holds no results table of `ovseg bench synthetic`")
            kept = kept_rows(stored, [names[v] for v in keep])
            if kept["unit"] != unit:
                raise ValueError(f"its budgets are in {kept['unit']}, these in {unit}")
        except ValueError as error:
            typer.echo(f"ovseg bench synthetic: cannot keep rows of section {section} in {results}: {error}", err=True)
            raise typer.Exit(2)
    world_cfg = WorldConfig(n_train=n_train, n_val=100, n_test=300, style=style)
    prepared = prepare_synthetic_data(out, world_cfg, 2, Stopwatch(typer.echo))
    measured = benchmark_synthetic(out, prepared, [names[v] for v in asked], budgets, unit, seed_list, threads,
                                   parallel, device, preset, recipe["overrides"], style, kept,
                                   images=doc.parent / "images", command=_command(ctx), label=label)
    _record(measured, results, doc)


@app.command("grouping-probe")
def bench_grouping_probe(
    ctx: typer.Context,
    steps: int = typer.Option(1000, "--steps", min=1, help="Training steps of each probe."),
    batch_size: int = typer.Option(64, "--batch-size", min=2, help="Images per step."),
    n_train: int = typer.Option(2000, "--n-train", min=64, help="Training images drawn from the world."),
    depths: str = typer.Option("", "--depths", help="Comma-separated blocks before + after the grouping, one probe each \\[default: 2+2,1+1; with --preset: the preset's own]."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    grouping: str = typer.Option("learned", "--grouping", help="learned (GroupViT's assignment) or cluster (ovseg's k-means); not with --preset."),
    hard: bool = typer.Option(True, "--hard/--soft", help="Learned grouping: Gumbel straight-through one-hot in training (the official) or the plain softmax; not with --preset."),
    style: str = typer.Option("standard", "--style", help="The synthetic world's style: standard or textured."),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Also score val every this many steps (0: before and after only)."),
    target: str = typer.Option("image", "--target", help="image (which shapes the image holds: a caption's weak label) or pixels (each pixel's class through its group: can the grouping draw the masks)."),
    preset: str = typer.Option("", "--preset", help="Train this preset's own image encoder (with the overrides) instead of the probe's small one; with --target pixels, also scores its own labels' mIoU on 300 test images: a supervised reference for `ovseg bench synthetic` at the same steps and batch."),
    tag: str = typer.Option("", "--tag", help="With --preset: name the results section grouping-probe-PRESET-TAG-TARGET[-STYLE] (letters, digits and dashes); required with overrides."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help="With --preset: model overrides, model.key=value."),
):
    """Does the grouping keep several groups per image when trained on the true labels? A
    supervised probe on the synthetic world (no text): groups per val image and group-majority
    mIoU, before and after training. With --preset and --target pixels: what that preset's
    image encoder reaches in the step budget when told every pixel's class."""
    from ovseg.benchmarks.grouping_probe import ProbeConfig, benchmark_grouping_probe
    from ovseg.training.config import ConfigError, resolve

    if style not in ("standard", "textured"):
        raise typer.BadParameter(f"takes standard or textured, not {style!r}", param_hint="--style")
    if target not in ("image", "pixels"):
        raise typer.BadParameter(f"takes image or pixels, not {target!r}", param_hint="--target")
    if tag and not _is_name(tag):
        raise typer.BadParameter(f"takes letters, digits and dashes, not {tag!r}", param_hint="--tag")
    overrides = list(overrides or ())
    if preset:
        try:
            if depths:
                raise ConfigError("--depths sizes the probe's own encoder; with --preset give "
                                  "model.depth_before=N model.depth_after=N")
            if overrides and not tag:
                raise ConfigError("an encoder changed by overrides needs a name for its results section (--tag NAME)")
            if any(not o.startswith("model.") for o in overrides):
                raise ConfigError(f"the probe trains the image encoder alone: only model.* overrides apply, not {overrides}")
            resolve(preset, overrides=overrides)
        except ConfigError as error:
            typer.echo(f"ovseg bench grouping-probe: {error}", err=True)
            raise typer.Exit(2)
        configs = [ProbeConfig(preset=preset, overrides=tuple(overrides), steps=steps, batch_size=batch_size,
                               seed=int(seed), style=style, eval_every=eval_every, target=target, n_train=n_train,
                               n_test=300 if target == "pixels" else 0)
                   for seed in seeds.split(",")]
    else:
        if overrides or tag:
            raise typer.BadParameter("overrides and --tag go with --preset", param_hint="--tag")
        configs = [ProbeConfig(grouping=grouping, hard_assignment=hard, depth_before=int(before), depth_after=int(after),
                               steps=steps, seed=int(seed), style=style, eval_every=eval_every, target=target,
                               n_train=n_train, batch_size=batch_size)
                   for before, after in (depth.split("+") for depth in (depths or "2+2,1+1").split(","))
                   for seed in seeds.split(",")]
    _record(benchmark_grouping_probe(configs, threads, command=_command(ctx), echo=typer.echo, tag=tag,
                                     progress=True), results, doc)


@app.command("grouping-dynamics")
def bench_grouping_dynamics(
    ctx: typer.Context,
    out: Path = typer.Option(Path("bench-dynamics"), "--out", help="Folder for the world (OUT/world, OUT/data) and the runs (OUT/dynamics/runs, reused when their config matches)."),
    style: str = typer.Option("standard", "--style", help="The synthetic world's style: standard or textured."),
    preset: str = typer.Option("synthetic-paper", "--preset", help="The preset whose first stage trains (its grouping must be learned)."),
    runs: str = typer.Option("baseline", "--runs", help="Comma-separated runs by name, each a remedy (ovseg.benchmarks.grouping_dynamics.RUNS); NAME@SEED runs that seed only."),
    steps: int = typer.Option(500, "--steps", min=1, help="Stage 1 steps of each run."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="Stage 1 batch \\[default: the preset's]."),
    eval_every: int = typer.Option(100, "--eval-every", min=1, help="Score the fixed val images every this many steps."),
    n_val: int = typer.Option(100, "--n-val", min=1, help="Fixed val images scored."),
    n_train: int = typer.Option(6000, "--n-train", min=64, help="Training images in the synthetic world."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated training seeds: each run once per seed."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    tag: str = typer.Option("", "--tag", help="Name the results section grouping-dynamics-STEPS-TAG, so that this study does not replace another at the same budget (letters, digits and dashes)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides for every run, key.sub=value."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """Does the learned grouping collapse while a preset trains, and why? Trains stage 1 for a
    step budget and records, on fixed val images, the assignment's entropy, groups per image and
    group-majority mIoU, and the gradient that reaches the assignment logits; one run per remedy."""
    from ovseg.benchmarks.grouping_dynamics import RUNS, benchmark_grouping_dynamics, named_config
    from ovseg.cli.pipeline import Stopwatch, prepare_synthetic_data
    from ovseg.curation.synthetic import WorldConfig
    from ovseg.training.config import resolve

    if style not in ("standard", "textured"):
        raise typer.BadParameter(f"takes standard or textured, not {style!r}", param_hint="--style")
    if tag and not _is_name(tag):
        raise typer.BadParameter(f"takes letters, digits and dashes, not {tag!r}", param_hint="--tag")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        # NAME or NAME@SEED (that seed only)
        asked = [(n.strip().partition("@")[0], [int(n.partition("@")[2])] if "@" in n else seed_list)
                 for n in runs.split(",") if n.strip()]
    except ValueError:
        seed_list, asked = [], []
    if not seed_list or not asked:
        raise typer.BadParameter(f"--seeds and --runs' @SEED take integers, not {seeds!r} / {runs!r}", param_hint="--seeds")
    unknown = [n for n, _ in asked if n not in RUNS]
    if unknown:
        raise typer.BadParameter(f"unknown runs {unknown}; known: {', '.join(RUNS)}", param_hint="--runs")
    (preset_name,) = _presets(preset)
    if resolve(preset_name, overrides=tuple(overrides or ())).model.grouping != "learned":
        raise typer.BadParameter(f"{preset_name} does not use the learned grouping (model.grouping=learned)",
                                 param_hint="--preset")
    prepared = prepare_synthetic_data(out, WorldConfig(n_train=n_train, n_val=100, n_test=300, style=style), 2,
                                      Stopwatch(typer.echo))
    configs = [named_config(name, preset=preset_name, overrides=tuple(overrides or ()), steps=steps,
                            batch_size=batch_size, eval_every=eval_every, n_val=n_val, seed=seed)
               for name, run_seeds in asked for seed in run_seeds]
    section = benchmark_grouping_dynamics(out / "dynamics", Path(prepared["data"]), out / "world" / "voc", configs,
                                          threads, style, command=_command(ctx), echo=typer.echo, tag=tag)
    _record(section, results, doc)


@app.command("world")
def bench_world(
    ctx: typer.Context,
    out: Path = typer.Option(Path("bench-world"), "--out", help="Folder for the worlds and the random models."),
    styles: str = typer.Option("standard,textured", "--styles", help="Comma-separated world styles."),
    presets: str = typer.Option("synthetic-small,synthetic-paper", "--presets", help="Comma-separated presets (random init)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random models."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """How much a random model's grouping already segments each world style: the group-majority
    mIoU of untrained presets (what the world gives away), beside chance and the grid ceiling."""
    import torch

    from ovseg.benchmarks.world_difficulty import benchmark_world

    chosen_styles = tuple(s.strip() for s in styles.split(",") if s.strip())
    if not chosen_styles or any(s not in ("standard", "textured") for s in chosen_styles):
        raise typer.BadParameter(f"takes standard and/or textured, not {styles!r}", param_hint="--styles")
    names = _presets(presets)
    torch.set_num_threads(threads)
    _record(benchmark_world(out, chosen_styles, names, seed, command=_command(ctx)), results, doc)


@app.command("mask-targets")
def bench_mask_targets(
    ctx: typer.Context,
    checkpoints: List[str] = typer.Argument(..., help="Checkpoints to measure, each NAME=PATH or PATH (named by its file)."),
    out: Path = typer.Option(Path("bench-synthetic"), "--out", help="The `ovseg bench synthetic` folder whose world and cross-image pairs are read."),
    pairs: int = typer.Option(512, "--pairs", min=1, help="Pairs measured (each in both directions)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pairs' draw."),
    threads: int = typer.Option(2, "--threads", help="torch threads."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """What the mask-consistency loss trains on: for pairs of synthetic training images that
    share a class, how much of each kept group and of the target it is matched to lies on the
    shared object, under each checkpoint's own loss settings and under the paper's form of the
    loss (dice matching on the assignment grid, 4 groups kept)."""
    import torch

    from ovseg.benchmarks.mask_targets import mask_target_quality, report, synthetic_pairs
    from ovseg.training.checkpoint import load_model

    named = _named_checkpoints(checkpoints, by=lambda path: path.name)
    torch.set_num_threads(threads)
    measured = {}
    for name, path in named.items():
        model = load_model(path)
        try:
            measured[name] = mask_target_quality(model, synthetic_pairs(out, pairs, seed))
        except (FileNotFoundError, TypeError, ValueError) as error:
            typer.echo(f"ovseg bench mask-targets: {error}", err=True)
            raise typer.Exit(2)
    _record(report(measured, command=_command(ctx)), results, doc)


@app.command("heldout")
def bench_heldout(
    ctx: typer.Context,
    checkpoints: List[str] = typer.Argument(..., help="Training checkpoints (a run's stageN/last.pt), each NAME=PATH or PATH."),
    out: Path = typer.Option(Path("bench-synthetic"), "--out", help="The `ovseg bench synthetic` folder whose training data the checkpoints were trained on; the unseen world goes to OUT/heldout."),
    images: int = typer.Option(1024, "--images", min=64, help="Images of the unseen world (drawn once, reused by later calls)."),
    batches: int = typer.Option(8, "--batches", min=1, help="Batches of each kind averaged, at the checkpoint stage's batch size."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads."),
    tag: str = typer.Option("", "--tag", help="Name the results section heldout-TAG, so that one study does not replace another (letters, digits and dashes)."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """Does a model learn the synthetic world or memorise its training images? Each checkpoint's
    training losses on its own training images and on images of the same world it never saw."""
    import json

    import torch

    from ovseg.benchmarks.heldout import heldout_world_config, measure, report
    from ovseg.cli.pipeline import Stopwatch, prepare_synthetic_data

    if tag and not _is_name(tag):
        raise typer.BadParameter(f"takes letters, digits and dashes, not {tag!r}", param_hint="--tag")
    named = _named_checkpoints(checkpoints, by=str)
    prepared_json = out / "prepared.json"
    if not prepared_json.is_file():
        raise typer.BadParameter(f"{out} holds no prepared world (no prepared.json): run `ovseg bench synthetic --out {out}` first",
                                 param_hint="--out")
    prepared = json.loads(prepared_json.read_text())
    heldout = prepare_synthetic_data(out / "heldout", heldout_world_config(prepared, images), 2, Stopwatch(typer.echo))
    torch.set_num_threads(threads)
    rows = measure(named, out / "data", Path(heldout["data"]), batches, echo=typer.echo)
    _record(report(rows, heldout["downloads"].get("success", images), batches, command=_command(ctx), tag=tag),
            results, doc)


@app.command("train")
def bench_train(
    ctx: typer.Context,
    presets: str = typer.Option("test,synthetic-small", "--presets", "--preset", help="Comma-separated presets to time (hub-initialised ones, like paper, run with random weights of the same shape)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size \\[default: the preset's]."),
    steps: int = typer.Option(10, help="Timed steps per preset."),
    loader: bool = typer.Option(True, help="Also measure loader throughput per core."),
    accumulation: str = typer.Option("2,4,8", "--accumulation", help="Comma-separated micro-batch counts k at which to time plain and cached gradient accumulation against one batch (empty: none)."),
    accumulation_preset: Optional[str] = typer.Option(None, "--accumulation-preset", help="Preset of the accumulation rows \\[default: synthetic-paper on cpu, paper on cuda]."),
    accumulation_batch: Optional[int] = typer.Option(None, "--accumulation-batch", help="Global batch of the accumulation rows, divisible by each k \\[default: 64 on cpu, 256 on cuda]."),
    threads: int = typer.Option(2, "--threads", help="CPU threads of the accumulation rows."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides for every preset, key.sub=value."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, help=DOC_HELP),
) -> None:
    """Loader samples/s per core, training steps/s (and peak memory) of presets, and what plain
    and cached gradient accumulation cost against one batch."""
    from ovseg.benchmarks.train import benchmark_train

    try:
        ks = tuple(int(k) for k in accumulation.split(",") if k.strip())
    except ValueError:
        typer.echo(f"ovseg bench train: --accumulation wants whole numbers, not {accumulation!r}", err=True)
        raise typer.Exit(2)
    batch = accumulation_batch or (256 if device.startswith("cuda") else 64)
    if any(k < 1 or batch % k for k in ks):
        typer.echo(f"ovseg bench train: each --accumulation k must divide the batch {batch}", err=True)
        raise typer.Exit(2)
    section, _ = benchmark_train(tuple(p.strip() for p in presets.split(",") if p.strip()), device, batch_size, steps,
                                 loader, tuple(overrides or ()), command=_command(ctx), accumulation=ks,
                                 accumulation_preset=accumulation_preset, accumulation_batch=accumulation_batch,
                                 threads=threads)
    _record(section, results, doc)


@app.command("batch-plan")
def bench_batch_plan(
    ctx: typer.Context,
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, help=DOC_HELP),
) -> None:
    """The official global batches (2,048, 1,024, 4,096) on 8, 4 and 1 GPUs of 24, 40 and 80 GB:
    micro-batch, micro-batches per step and hours for the official epochs, projected from the
    stored GPU measurement (`ovseg bench train --device cuda`) and parameter counts."""
    from ovseg.benchmarks.batch_plan import benchmark_batch_plan

    try:
        section, _ = benchmark_batch_plan(results, command=_command(ctx))
    except ValueError as error:
        typer.echo(f"ovseg bench batch-plan: {error}", err=True)
        raise typer.Exit(2)
    _record(section, results, doc)


@app.command("curate")
def bench_curate(
    ctx: typer.Context,
    rows: int = typer.Option(12_423_374, "--rows", help="Generated parsed rows for select..pairs (CC12M has 12,423,374)."),
    parse_captions: int = typer.Option(2000, "--parse-captions", help="Captions parsed by each pipeline for captions/s."),
    threads: int = typer.Option(2, "--threads", help="DuckDB threads for select..pairs (the target is for 2)."),
    memory_limit: str = typer.Option("3GB", "--memory-limit", help="DuckDB memory_limit for select..pairs."),
    cores: int = typer.Option(16, "--cores", help="Cores of the machine the whole-CC12M time is extrapolated to."),
    results: Path = typer.Option(RESULTS, "--results", help=RESULTS_HELP),
    doc: Path = typer.Option(DOC, "--doc", help=DOC_HELP),
) -> None:
    """Curation speed: parse captions/s against spaCy's full pipeline, select..pairs time and peak memory, CC12M extrapolation."""
    from ovseg.benchmarks.curate import benchmark_curate

    section, _ = benchmark_curate(rows=rows, parse_captions=parse_captions, threads=threads, memory_limit=memory_limit,
                                  cores=cores, command=_command(ctx))
    _record(section, results, doc)
