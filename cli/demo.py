"""`ovseg demo`: the real pipeline end to end on the built-in synthetic world, on a laptop."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the world, the data, the run and the report."),
    quick: bool = typer.Option(False, "--quick", help="Smoke-sized run (a couple of minutes): 600 training images, seconds of training."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Training budget in minutes, split 70/30 between stage 1 and stage 2 \\[default: 10 + 4]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world and of training."),
    workers: int = typer.Option(2, "--workers", help="spaCy parse processes."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Training config overrides, key.sub=value."),
) -> None:
    """Generate the synthetic world, curate it (spaCy, DuckDB), download it with img2dataset from a
    loopback server, train both stages on the CPU, evaluate zero-shot and write a report."""
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from ovseg.cli.pipeline import DemoConfig, run_demo

    cfg = DemoConfig.quick(out) if quick else DemoConfig(out=out)
    if minutes is not None:
        if minutes <= 0:
            typer.echo("ovseg demo: --minutes must be positive", err=True)
            raise typer.Exit(2)
        cfg.stage1_minutes, cfg.stage2_minutes = 0.7 * minutes, 0.3 * minutes
    cfg.seed, cfg.workers, cfg.overrides = seed, workers, list(overrides or [])
    run_demo(cfg, report=typer.echo)
