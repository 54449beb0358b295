"""`ovseg train`: OVSegmentor training on one CPU or, under torchrun, on many GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer


def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides as key.sub=value, e.g. train.stages.1.steps=200 model.num_groups=8 (stages are numbered from 1)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="The curated DATA folder (manifest, downloads, images, pairs); sets data.data_dir."),
    run: Path = typer.Option(Path("runs/ovseg"), "--run-dir", "--run", "-r", help="Run folder: config, metrics.jsonl, checkpoints. A folder that holds a checkpoint is resumed. (--run is an alias, but torchrun takes it for its own --run-path: under torchrun write --run-dir.)"),
    preset: str = typer.Option("synthetic-small", "--preset", "-p", help="Named preset (see `ovseg train --list-presets`)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file merged over the preset, before the overrides."),
    stage: str = typer.Option("both", "--stage", help="N: train the N-th stage of train.stages into RUN (stage 1: contrastive + masked entity; stage 2: adds mask consistency, from --init); both: every stage in order into RUN/stage1, RUN/stage2, ..."),
    init: Optional[Path] = typer.Option(None, "--init", help="A later stage: the previous stage's checkpoint (RUN/stage1/last.pt after --stage both; RUN/last.pt after --stage 1)."),
    nproc_per_node: int = typer.Option(0, "--nproc-per-node", help="Launch this many processes with torchrun (one per GPU); 0 runs in this process."),
    nnodes: int = typer.Option(1, "--nnodes", help="With --nproc-per-node: number of machines."),
    node_rank: int = typer.Option(0, "--node-rank", help="With --nnodes > 1: this machine's rank."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="With --nnodes > 1: address of node 0."),
    master_port: int = typer.Option(29500, "--master-port", help="Port of the rendezvous on node 0."),
    val: Optional[str] = typer.Option(None, "--val", help="Periodic zero-shot validation every train.eval_every steps, as NAME:PATH (e.g. synthetic:OUT/voc); always the val split, never test."),
    val_images: int = typer.Option(50, "--val-images", help="Images of the val split used by --val."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the presets and exit."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (logs only)."),
) -> None:
    """Train OVSegmentor (one stage, or every stage in order) from the curated data contract."""
    from ovseg.training.config import ConfigError, resolve

    if list_presets:
        from ovseg.training.presets import list_presets as names

        for name in names():
            typer.echo(name)
        return
    if stage != "both" and not (stage.isdigit() and int(stage) >= 1):
        typer.echo(f"ovseg train: --stage must be a stage number (1, 2, ...) or both, not {stage!r}", err=True)
        raise typer.Exit(2)
    if nproc_per_node > 0:
        _launch_torchrun(nproc_per_node, nnodes, node_rank, master_addr, master_port)
        return
    extra = list(overrides or [])
    if data is not None:
        extra.append(f"data.data_dir={data}")
    try:
        cfg = resolve(preset, config, extra)
    except (ConfigError, FileNotFoundError) as error:
        typer.echo(f"ovseg train: {error}", err=True)
        raise typer.Exit(2)
    if not cfg.data.data_dir:
        typer.echo("ovseg train: no data: pass --data DATA (a folder made by `ovseg curate`)", err=True)
        raise typer.Exit(2)
    from ovseg.training.data import data_dir_exists

    if not data_dir_exists(cfg.data.data_dir):
        typer.echo(f"ovseg train: {cfg.data.data_dir} has no manifest/ and downloads.parquet: run `ovseg curate` first", err=True)
        raise typer.Exit(2)
    if stage != "both" and int(stage) > len(cfg.train.stages):
        typer.echo(f"ovseg train: --stage {stage}: the config has {len(cfg.train.stages)} stages (train.stages)", err=True)
        raise typer.Exit(2)
    if stage not in ("both", "1") and init is None and not (run / "ckpt").exists():
        previous = int(stage) - 1
        typer.echo(f"ovseg train: stage {stage} needs --init RUN/stage{previous}/last.pt (stage {previous}'s "
                   "checkpoint) or a run folder to resume", err=True)
        raise typer.Exit(2)
    if init is not None and not init.is_file():
        typer.echo(f"ovseg train: --init {init} does not exist (stage 1 with --run-dir R --stage 1 writes R/last.pt)", err=True)
        raise typer.Exit(2)
    # a run built from a checkpoint (stage 2's --init, or a resume) takes no weights from the hub
    from_checkpoint = init is not None or any((run / sub / "ckpt").exists() for sub in (".", "stage1"))
    problem = None if from_checkpoint else _model_source_problem(cfg.model)
    if problem:
        typer.echo(f"ovseg train: {problem}", err=True)
        raise typer.Exit(2)

    from dataclasses import replace

    from ovseg.training.checkpoint import CheckpointError
    from ovseg.training.engine import TrainingError, train as train_stage, train_stages
    from ovseg.training.model.image_encoder import VisionInitError

    eval_fn = _validation(val, val_images) if val else None
    if eval_fn is not None and not cfg.train.eval_every:
        cfg = replace(cfg, train=replace(cfg.train, eval_every=cfg.train.ckpt_every))
    try:
        if stage == "both":
            summary = train_stages(cfg, run, eval_fn=eval_fn, progress=not no_progress)
        else:
            cfg = replace(cfg, train=replace(cfg.train, stage=int(stage)))
            summary = train_stage(cfg, run, init=init, eval_fn=eval_fn, progress=not no_progress)
    except TrainingError as error:
        typer.echo(f"ovseg train: {error}", err=True)
        raise typer.Exit(1)
    except CheckpointError as error:  # a damaged --init (a damaged resume point falls back to the one before)
        typer.echo(f"ovseg train: {error}", err=True)
        raise typer.Exit(2)
    except VisionInitError as error:  # model.vision_init: a missing file, or a timm name the hub does not give
        typer.echo(f"ovseg train: model.vision_init: {error}", err=True)
        raise typer.Exit(2)
    if int(os.environ.get("RANK", 0)) == 0:
        typer.echo(json.dumps(summary, indent=2))


def _model_source_problem(model_cfg) -> str | None:
    """What is wrong with the model's outside sources, in one line, or None. A text encoder from
    the hub is looked up (its config only) before anything is built: offline and not cached,
    transformers would retry for half a minute and then raise a traceback."""
    name = getattr(model_cfg, "text_pretrained", None)
    if not name:
        return None
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"model.text_pretrained={name} cannot be loaded ({first}); pass a local directory that holds "
                "the model, or model.text_pretrained=null for a randomly initialised text encoder")
    return None


def _validation(spec: str, images: int):
    """A callable (model, step) -> {"miou": ...} on the val split of a benchmark."""
    from ovseg.evaluation.datasets import DatasetNotFound
    from ovseg.evaluation.evaluate import evaluate_dataset, load_dataset, make_segmenter

    name, _, path = spec.partition(":")
    try:
        dataset = load_dataset(name, Path(path), "val")
    except (DatasetNotFound, ValueError) as error:
        typer.echo(f"ovseg train: --val {spec}: {error}", err=True)
        raise typer.Exit(2)

    def evaluate(model, step: int) -> dict[str, float]:
        device = str(next(model.parameters()).device)
        segmenter = make_segmenter(model, dataset, device=device)
        result = evaluate_dataset(segmenter, dataset, limit=images, progress=False)
        return {"miou": result.metrics.miou, "pixel_accuracy": result.metrics.pixel_accuracy}

    return evaluate


_UNAMBIGUOUS = {"--run": "--run-dir", "-r": "--run-dir", "-d": "--data", "-p": "--preset"}


def _launch_torchrun(nproc: int, nnodes: int, node_rank: int, addr: str, port: int) -> None:
    """Re-run this very command under torchrun, without the launcher options."""
    argv = sys.argv[1:]
    cleaned, skip = [], False
    launcher = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"}
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in launcher:
            skip = "=" not in arg
            continue
        # torchrun's own parser reads every argument and takes a unique prefix of its options
        # (--run of --run-path) or its short flags (-r, -d): pass ours in unambiguous spellings
        cleaned.append(_UNAMBIGUOUS.get(name, name) + arg[len(name):])
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={addr}",
               f"--master-port={port}", "-m", "ovseg.cli.main", *cleaned]
    raise typer.Exit(subprocess.call(command))
