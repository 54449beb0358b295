"""`ovseg eval voc|context|coco-object|ade20k|synthetic`: zero-shot segmentation benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Zero-shot segmentation mIoU on VOC, Context, COCO-Object, ADE20K or the synthetic world.",
    no_args_is_help=True,
)

DATA_HELP = {
    "voc": "Folder holding VOCdevkit/VOC2012 (or VOC2012 itself).",
    "context": "Folder holding VOCdevkit/VOC2010 with SegmentationClassContext (or VOC2010 itself).",
    "coco-object": "Folder holding coco_stuff164k with images/val2017 and *_instanceTrainIds.png masks.",
    "ade20k": "Folder holding ADEChallengeData2016 (or that folder itself).",
    "synthetic": "The OUT/voc folder written by `ovseg curate synthetic OUT` (or OUT).",
}
PROTOCOL_HELP = ("paper: the official OVSegmentor/GroupViT evaluation: short side 448 (long side at most 2048), "
                 "window 448 stride 224, the official class words, and GroupViT's labelling rule (one group per "
                 "pixel by argmax, classes outside the image's top 5 score 0, a pixel is background when its score "
                 "is below min(threshold, the window's best group score), background votes averaged over windows). "
                 "soft: the same windows with ovseg's earlier rule (pixels sum their groups' best-class scores "
                 "through the soft assignment, threshold once after averaging windows, ovseg's prompt words). "
                 "training-free: short side 336, window 224 stride 112, VOC and Context without background, soft rule. "
                 "See docs/evaluation.md.")
THRESHOLD_DEFAULT = {"voc": "the paper's 0.95", "context": "the paper's 0.35", "coco-object": "the paper's 0.9",
                     "ade20k": "none, ADE20K has no background class",
                     "synthetic": "0.5; better: --tune-threshold-on val"}
SCORING_HELP = ("How a group scores a class. softmax: the paper's softmax over the classes at the contrastive "
                "temperature. grounding: the grounding head's presence probability per class (models trained with "
                "the grounding loss; its background threshold is 0.5 unless --bg-threshold says otherwise: the paper's "
                "thresholds are for softmax; not with --protocol paper, whose official rule is softmax). "
                "auto: softmax under --protocol paper; otherwise grounding when the model trained with it, else softmax.")
DEFAULT_SPLIT = {"voc": "val", "context": "val", "coco-object": "val2017", "ade20k": "validation",
                 "synthetic": "test"}


def _run(name: str, data: Path, checkpoint: Path, output: Path, split: Optional[str], protocol: str,
         bg_threshold: Optional[float], tune_threshold_on: Optional[str], ensemble: bool,
         top_k: Optional[int], save_pictures: int, limit: Optional[int], device: Optional[str],
         diagnostics: bool, batch_size: int, scoring: str) -> None:
    from ovseg.evaluation.datasets import DatasetNotFound
    from ovseg.evaluation.evaluate import run_evaluation

    if not checkpoint.exists():
        typer.echo(f"ovseg eval: checkpoint not found: {checkpoint}", err=True)
        raise typer.Exit(2)
    try:
        result = run_evaluation(
            name, data, checkpoint, output_dir=output, split=split or DEFAULT_SPLIT[name],
            protocol=protocol, bg_threshold=bg_threshold, tune_threshold_on=tune_threshold_on,
            ensemble=ensemble, top_k=top_k, save_pictures=save_pictures, limit=limit,
            device=device, diagnostics=diagnostics, batch_size=batch_size, scoring=scoring,
        )
    except DatasetNotFound as error:
        typer.echo(f"ovseg eval {name}: data set not found: {error}", err=True)
        raise typer.Exit(2)
    except ValueError as error:
        typer.echo(f"ovseg eval {name}: {error}", err=True)
        raise typer.Exit(2)
    m = result.metrics
    line = f"{name}: mIoU {100 * m.miou:.2f}  pixel acc {100 * m.pixel_accuracy:.2f}  mean acc {100 * m.mean_accuracy:.2f}"
    if result.bg_threshold is not None:
        line += f"  (background threshold {result.bg_threshold:.2f}, {result.scoring} scoring)"
    if result.group_majority is not None:
        line += f"  group-majority mIoU {100 * result.group_majority.miou:.2f}"
    typer.echo(line)
    typer.echo(f"wrote {output / 'metrics.json'} and {output / 'metrics.md'}")


def _make_command(name: str):
    def command(
        checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Model checkpoint (.pt) from `ovseg train`."),
        data: Path = typer.Option(..., "--data", "-d", help=DATA_HELP[name]),
        output: Path = typer.Option(Path(f"eval-{name}"), "--output", "-o", help="Folder for metrics.json, metrics.md and pictures."),
        split: Optional[str] = typer.Option(None, help=f"Split to measure (default: {DEFAULT_SPLIT[name]})."),
        protocol: str = typer.Option("paper", help=PROTOCOL_HELP if name != "synthetic" else "Ignored: the synthetic world is measured at its own size, one window per image."),
        bg_threshold: Optional[float] = typer.Option(None, help="Background threshold on the class probability (default: " + THRESHOLD_DEFAULT[name] + ")."),
        scoring: str = typer.Option("auto", help=SCORING_HELP),
        tune_threshold_on: Optional[str] = typer.Option(None, help="Choose the background threshold on this split (e.g. val) before measuring; never the measured split."),
        ensemble: bool = typer.Option(False, help="Average several prompt templates instead of the paper's single one."),
        top_k: Optional[int] = typer.Option(None, help="Keep only the k classes most similar to the whole image (--protocol paper: 5 unless set here; other protocols: off unless set)."),
        save_pictures: int = typer.Option(0, help="Save colour predictions and image/truth/prediction/groups panels for the first N images."),
        limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images (smoke tests)."),
        device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
        diagnostics: bool = typer.Option(False, help="Also report group-majority mIoU (each group given its majority true label)."),
        batch_size: int = typer.Option(16, min=1, help="Windows per forward pass (across images when each image is one window)."),
    ) -> None:
        _run(name, data, checkpoint, output, split, protocol, bg_threshold, tune_threshold_on,
             ensemble, top_k, save_pictures, limit, device, diagnostics, batch_size, scoring)

    command.__doc__ = f"Zero-shot segmentation on {name}: mIoU, pixel accuracy, per-class IoU."
    return command


for _name in DATA_HELP:
    app.command(_name)(_make_command(_name))
