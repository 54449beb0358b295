"""`ovseg segment IMAGE... --checkpoint CKPT --vocab "cat,dog,sofa"`: your images, your words."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def segment(
    images: List[Path] = typer.Argument(..., help="Image files to segment."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Model checkpoint (.pt) from `ovseg train`."),
    vocab: str = typer.Option(..., "--vocab", help='Comma-separated class names, e.g. "cat,dog,sofa".'),
    output: Path = typer.Option(Path("segment-out"), "--output", "-o", help="Folder for the overlays and label maps."),
    bg_threshold: float = typer.Option(0.5, help="Pixels whose best class probability is below this are background."),
    short_side: Optional[int] = typer.Option(None, help="Resize the short side to this before inference (default: the model's training size)."),
    scoring: str = typer.Option("auto", help="How a group scores a class: softmax (the paper's), grounding (the grounding head's presence probability) or auto (grounding when the model trained with it)."),
    groups: bool = typer.Option(False, "--groups", help="Also save the group map."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Open-vocabulary segmentation of your own images with your own words."""
    from ovseg.evaluation.segment import segment_images

    names = [w.strip() for w in vocab.split(",") if w.strip()]
    if not names:
        typer.echo("ovseg segment: --vocab needs at least one class name", err=True)
        raise typer.Exit(2)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        typer.echo(f"ovseg segment: --vocab names {', '.join(repeated)} more than once", err=True)
        raise typer.Exit(2)
    from ovseg.evaluation.segmenter import SCORINGS

    if scoring not in SCORINGS:
        typer.echo(f"ovseg segment: unknown --scoring {scoring!r}; choose from {', '.join(SCORINGS)}", err=True)
        raise typer.Exit(2)
    missing = [p for p in [checkpoint, *images] if not p.exists()]
    if missing:
        typer.echo(f"ovseg segment: file not found: {missing[0]}", err=True)
        raise typer.Exit(2)
    from ovseg.evaluation.segment import check_images

    try:
        check_images(images)  # all of them, before the model loads
    except ValueError as error:
        typer.echo(f"ovseg segment: {error}", err=True)
        raise typer.Exit(2)
    if output.exists() and not output.is_dir():
        typer.echo(f"ovseg segment: --output {output} is a file, not a folder", err=True)
        raise typer.Exit(2)
    from ovseg.training.checkpoint import CheckpointError

    try:
        for written in segment_images(images, checkpoint, names, output, bg_threshold=bg_threshold,
                                      short_side=short_side, save_groups=groups, device=device, scoring=scoring):
            typer.echo(f"wrote {written}")
    except CheckpointError as error:
        typer.echo(f"ovseg segment: {error}", err=True)
        raise typer.Exit(2)
