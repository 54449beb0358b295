"""`ovseg demo`: the real pipeline end to end on the built-in synthetic world, on a laptop."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the world, the data, the run and the report."),
    quick: bool = typer.Option(False, "--quick", help="Smoke-sized run (a couple of minutes): 600 training images, 80 training steps."),
    steps: Optional[int] = typer.Option(None, "--steps", min=2, help="Training steps, the last 30% in stage 2, at the preset's batch sizes \\[default: 2000, the README table's budget, whose '+ mask (full)' cell this run then is]."),
    seed: int = typer.Option(0, "--seed", help="Training seed (the table's seeds are 0 and 1); the world is always the benchmark's."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads: they change how long training takes, and the result only by float rounding."),
    workers: int = typer.Option(2, "--workers", help="spaCy parse processes."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Training config overrides, key.sub=value."),
) -> None:
    """Generate the synthetic world, curate it (spaCy, DuckDB), download it with img2dataset from a
    loopback server, train both stages on the CPU, evaluate zero-shot and write a report.

    Without --quick this is one cell of the README's table: `ovseg bench synthetic`'s full method
    on the same world, preset and step budget."""
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from ovseg.cli.pipeline import DemoConfig, run_demo

    cfg = DemoConfig.quick(out) if quick else DemoConfig(out=out)
    if steps is not None:
        cfg.steps = steps
    cfg.seed, cfg.threads, cfg.workers, cfg.overrides = seed, threads, workers, list(overrides or [])
    from ovseg.benchmarks.synthetic import check_recipe
    from ovseg.training.config import ConfigError, resolve

    try:  # a finished run in OUT is reused: it must be of this recipe
        resolve(cfg.preset, overrides=cfg.overrides)
        check_recipe(Path(out), {"preset": cfg.preset, "overrides": cfg.overrides})
    except ConfigError as error:
        typer.echo(f"ovseg demo: {error}", err=True)
        raise typer.Exit(2)
    run_demo(cfg, report=typer.echo)
