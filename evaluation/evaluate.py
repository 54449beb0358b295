"""Evaluate a model on a benchmark: the library function behind `ovseg eval`."""

from __future__ import annotations

import inspect
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ovseg.evaluation import datasets as ds
from ovseg.evaluation.metrics import ConfusionMatrix, SegmentationMetrics, group_majority_labels
from ovseg.evaluation.pictures import colourise, group_picture, palette_png, side_by_side
from ovseg.evaluation.segmenter import (
    ENSEMBLE_TEMPLATES, PAPER_TEMPLATE, PROTOCOLS, SCORINGS, Protocol, ZeroShotSegmenter, resolve_scoring,
    synthetic_protocol,
)

log = logging.getLogger(__name__)

THRESHOLD_GRID = tuple(round(float(t), 2) for t in np.arange(0.05, 1.0, 0.05))


@dataclass
class EvalResult:
    metrics: SegmentationMetrics
    bg_threshold: float | None
    group_majority: SegmentationMetrics | None
    output_dir: Path | None
    scoring: str = "softmax"  # how groups scored the classes (see evaluation.segmenter)


def load_dataset(name: str, data: Path, split: str | None = None, protocol: str = "paper") -> ds.SegmentationDataset:
    """A benchmark by name. Under the training-free protocol VOC and Context drop background."""
    if name not in ds.LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(ds.LOADERS)}")
    kwargs = {"split": split} if split else {}
    if name in ("voc", "context") and protocol == "training-free":
        kwargs["with_background"] = False
    return ds.LOADERS[name](Path(data), **kwargs)


def default_split(name: str) -> str:
    """The split a data set's loader measures when none is named."""
    if name not in ds.LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(ds.LOADERS)}")
    return inspect.signature(ds.LOADERS[name]).parameters["split"].default


def resolve_protocol(name: str, dataset: ds.SegmentationDataset, model=None) -> Protocol:
    """The protocol by name; the synthetic world always uses its own (one window at the model's
    training size, the soft rule)."""
    if dataset.name == "synthetic":
        return synthetic_protocol(int(getattr(model, "image_size", 64)))
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def make_segmenter(model, dataset: ds.SegmentationDataset, *, protocol: str = "paper",
                   bg_threshold: float | None = None, ensemble: bool = False,
                   top_k: int | None = None, device: str = "cpu", batch_size: int = 16,
                   scoring: str = "auto") -> ZeroShotSegmenter:
    """The data set's segmenter. The protocol fixes the labelling rule and the class words
    (the official ones under `paper`). Without a threshold: the paper's for softmax scoring,
    and 0.5 (the presence head's own decision boundary) for grounding scoring."""
    chosen = resolve_protocol(protocol, dataset, model)
    if chosen.rule == "official" and scoring == "auto":
        scoring = "softmax"  # the official rule is defined on softmax scores
    scoring = resolve_scoring(model, scoring)
    paper = dataset.bg_threshold if scoring == "softmax" else None
    threshold = bg_threshold if bg_threshold is not None else (paper or 0.5)
    names = dataset.official_prompt_classes if chosen.prompts == "official" else dataset.prompt_classes
    return ZeroShotSegmenter(
        model, names,
        templates=ENSEMBLE_TEMPLATES if ensemble else (PAPER_TEMPLATE,),
        with_background=dataset.has_background, bg_threshold=threshold,
        protocol=chosen, top_k=top_k, device=device, batch_size=batch_size, scoring=scoring,
    )


def _batches(dataset: ds.SegmentationDataset, n: int, size: int):
    """(indices, images, labels) of the first n items in batches of `size`; the next batch is
    decoded in a background thread while the current one is segmented."""
    starts = list(range(0, n, size))
    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = lambda start: [dataset.load(i) for i in range(start, min(start + size, n))]  # noqa: E731
        pending = pool.submit(load, starts[0])
        for k, start in enumerate(starts):
            items = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(load, starts[k + 1])
            yield list(range(start, start + len(items))), [im for im, _ in items], [lb for _, lb in items]


def tune_threshold(segmenter: ZeroShotSegmenter, dataset: ds.SegmentationDataset,
                   grid=THRESHOLD_GRID, limit: int | None = None) -> float:
    """The background threshold that maximises mIoU on `dataset`, which must be another split
    than the one the segmenter will be measured on (`run_evaluation` checks that)."""
    matrices = {t: ConfusionMatrix(len(dataset.classes)) for t in grid}
    n = len(dataset) if limit is None else min(limit, len(dataset))
    with tqdm(total=n, desc=f"tune threshold on {dataset.name}", unit="img") as bar:
        for _, images, labels in _batches(dataset, n, segmenter.batch_size):
            for by_threshold, label in zip(segmenter.labels_for_thresholds(images, grid), labels):
                for t, matrix in matrices.items():
                    matrix.update(label, by_threshold[float(t)])
            bar.update(len(images))
    best = max(grid, key=lambda t: np.nan_to_num(matrices[t].compute().miou, nan=-1.0))
    log.info("background threshold %.2f chosen on %s", best, dataset.name)
    return float(best)


def evaluate_dataset(segmenter: ZeroShotSegmenter, dataset: ds.SegmentationDataset, *,
                     output_dir: Path | None = None, save_pictures: int = 0,
                     limit: int | None = None, diagnostics: bool = False,
                     progress: bool = True) -> EvalResult:
    """mIoU and friends of `segmenter` on `dataset`; writes metrics and pictures if asked."""
    n_classes = len(dataset.classes)
    confusion = ConfusionMatrix(n_classes)
    majority = ConfusionMatrix(n_classes) if diagnostics else None
    n = len(dataset) if limit is None else min(limit, len(dataset))
    pictures_dir = None
    if output_dir is not None and save_pictures:
        pictures_dir = Path(output_dir) / "pictures"
        pictures_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=n, desc=f"eval {dataset.name}", unit="img", disable=not progress)
    for indices, images, labels in _batches(dataset, n, segmenter.batch_size):
        want_groups = diagnostics or (pictures_dir is not None and indices[0] < save_pictures)
        outputs = segmenter.scores_batch(images, with_groups=want_groups)
        for i, image, label, (scores, groups) in zip(indices, images, labels, outputs):
            prediction = segmenter.predict_from_scores(scores)
            confusion.update(label, prediction)
            if majority is not None:
                majority.update(label, group_majority_labels(groups.numpy(), label, n_classes))
            if pictures_dir is not None and i < save_pictures:
                stem = dataset.items[i][0].stem
                palette_png(prediction, dataset.palette, pictures_dir / f"{stem}_pred.png")
                panel = side_by_side(
                    [image, colourise(label, dataset.palette), colourise(prediction, dataset.palette),
                     group_picture(groups.numpy())],
                    ["image", "truth", "prediction", "groups"],
                    scale=max(1, 256 // max(image.shape[:2])),
                )
                panel.save(pictures_dir / f"{stem}_panel.png")
        bar.update(len(images))
    bar.close()
    metrics = confusion.compute(dataset.classes)
    majority_metrics = majority.compute(dataset.classes) if majority is not None else None
    if output_dir is not None:
        extra = {
            "dataset": dataset.name, "n_images": n, "protocol": segmenter.protocol.name,
            "bg_threshold": segmenter.bg_threshold if dataset.has_background else None,
            "scoring": segmenter.scoring, "templates": list(segmenter.templates),
        }
        if majority_metrics is not None:
            extra["group_majority_miou"] = majority_metrics.miou
        metrics.write(Path(output_dir), title=f"{dataset.name} ({n} images)", extra=extra)
    return EvalResult(metrics, segmenter.bg_threshold if dataset.has_background else None,
                      majority_metrics, output_dir, segmenter.scoring)


def run_evaluation(name: str, data: Path, checkpoint: Path, *, output_dir: Path | None = None,
                   split: str | None = None, protocol: str = "paper", bg_threshold: float | None = None,
                   tune_threshold_on: str | None = None, ensemble: bool = False,
                   top_k: int | None = None, save_pictures: int = 0, limit: int | None = None,
                   device: str | None = None, diagnostics: bool = False, batch_size: int = 16,
                   scoring: str = "auto") -> EvalResult:
    """Load the checkpoint and the data set, optionally choose the background threshold on
    another split (never the one being measured), and evaluate."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    split = split or default_split(name)
    dataset = load_dataset(name, data, split, protocol)  # a missing data set fails before the model loads
    resolve_protocol(protocol, dataset)  # an unknown protocol fails before the model loads
    if tune_threshold_on is not None and tune_threshold_on == split:
        raise ValueError(f"the threshold must be chosen on another split than the one measured ({split})")
    tuning = None
    if tune_threshold_on is not None and dataset.has_background:
        tuning = load_dataset(name, data, tune_threshold_on, protocol)
        shared = {image for image, _ in tuning.items} & {image for image, _ in dataset.items}
        if shared:
            raise ValueError(f"the threshold must be chosen on another split than the one measured: "
                             f"{tune_threshold_on} shares {len(shared)} images with {split}")
    from ovseg.training.checkpoint import load_model

    model = load_model(checkpoint, map_location=device)
    segmenter = make_segmenter(model, dataset, protocol=protocol, bg_threshold=bg_threshold,
                               ensemble=ensemble, top_k=top_k, device=device, batch_size=batch_size,
                               scoring=scoring)
    if tuning is not None:
        segmenter.bg_threshold = tune_threshold(segmenter, tuning, limit=limit)
    result = evaluate_dataset(segmenter, dataset, output_dir=output_dir, save_pictures=save_pictures,
                              limit=limit, diagnostics=diagnostics)
    if output_dir is not None:
        (Path(output_dir) / "eval_config.json").write_text(json.dumps({
            "dataset": name, "data": str(data), "checkpoint": str(checkpoint), "split": split,
            "protocol": segmenter.protocol.name, "bg_threshold": segmenter.bg_threshold,  # as metrics.json names it
            "threshold_tuned_on": tune_threshold_on, "scoring": segmenter.scoring, "ensemble": ensemble, "top_k": top_k,
        }, indent=2))
    return result
