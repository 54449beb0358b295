"""Segmentation metrics from one confusion matrix.

The matrix is accumulated with `bincount` over (truth, prediction) pairs; pixels whose truth is
the ignore index (255) never count. Every metric (per-class IoU, mIoU, pixel accuracy, mean
accuracy) is derived from the matrix, so streaming over a data set and evaluating at once give
the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """An (n_classes, n_classes) matrix; rows are truth, columns are prediction."""

    def __init__(self, n_classes: int, ignore_index: int = IGNORE_INDEX):
        self.n_classes = n_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        truth = np.asarray(truth).reshape(-1).astype(np.int64)
        prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
        if truth.shape != prediction.shape:
            raise ValueError(f"truth has {truth.size} pixels, prediction {prediction.size}")
        keep = truth != self.ignore_index
        truth, prediction = truth[keep], prediction[keep]
        if truth.size and (truth.max() >= self.n_classes or truth.min() < 0):
            raise ValueError(f"truth label {int(truth.max())} outside 0..{self.n_classes - 1}")
        if prediction.size and (prediction.max() >= self.n_classes or prediction.min() < 0):
            raise ValueError(f"predicted label {int(prediction.max())} outside 0..{self.n_classes - 1}")
        self.matrix += np.bincount(
            truth * self.n_classes + prediction, minlength=self.n_classes**2
        ).reshape(self.n_classes, self.n_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def compute(self, class_names: list[str] | None = None) -> "SegmentationMetrics":
        return SegmentationMetrics.from_matrix(self.matrix, class_names)


@dataclass
class SegmentationMetrics:
    """Per-class IoU and accuracy (NaN for a class absent from both truth and prediction,
    or absent from truth for accuracy) and the means over the classes that count."""

    class_names: list[str]
    iou: list[float]
    accuracy: list[float]
    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    n_pixels: int

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, class_names: list[str] | None = None) -> "SegmentationMetrics":
        matrix = np.asarray(matrix, dtype=np.float64)
        n = matrix.shape[0]
        names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        true_positive = np.diag(matrix)
        in_truth = matrix.sum(axis=1)
        in_prediction = matrix.sum(axis=0)
        union = in_truth + in_prediction - true_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, true_positive / union, np.nan)
            accuracy = np.where(in_truth > 0, true_positive / in_truth, np.nan)
        total = matrix.sum()
        return cls(
            class_names=names,
            iou=[float(v) for v in iou],
            accuracy=[float(v) for v in accuracy],
            miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            pixel_accuracy=float(true_positive.sum() / total) if total else float("nan"),
            mean_accuracy=float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
            n_pixels=int(total),
        )

    def to_dict(self) -> dict:
        def clean(v: float) -> float | None:
            return None if np.isnan(v) else round(v, 6)

        return {
            "miou": clean(self.miou),
            "pixel_accuracy": clean(self.pixel_accuracy),
            "mean_accuracy": clean(self.mean_accuracy),
            "n_pixels": self.n_pixels,
            "per_class": {
                name: {"iou": clean(i), "accuracy": clean(a)}
                for name, i, a in zip(self.class_names, self.iou, self.accuracy)
            },
        }

    def to_markdown(self, title: str = "") -> str:
        def pct(v: float) -> str:
            return "n/a" if np.isnan(v) else f"{100 * v:.2f}"

        lines = [f"### {title}", ""] if title else []
        lines += [
            f"mIoU **{pct(self.miou)}**, pixel accuracy {pct(self.pixel_accuracy)}, "
            f"mean accuracy {pct(self.mean_accuracy)} ({self.n_pixels} pixels)",
            "",
            "| class | IoU | accuracy |",
            "|---|---:|---:|",
        ]
        lines += [f"| {n} | {pct(i)} | {pct(a)} |" for n, i, a in zip(self.class_names, self.iou, self.accuracy)]
        return "\n".join(lines) + "\n"

    def write(self, output_dir: Path, title: str = "", extra: dict | None = None) -> None:
        """Write `metrics.json` and `metrics.md` into `output_dir` (atomically)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        payload = {**(extra or {}), **self.to_dict()}
        for name, text in (("metrics.json", json.dumps(payload, indent=2)), ("metrics.md", self.to_markdown(title))):
            tmp = output_dir / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(output_dir / name)


def group_majority_labels(assignment: np.ndarray, truth: np.ndarray, n_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Diagnostic: give every pixel the majority true label of its group.

    `assignment` is (K, H, W) group scores at the resolution of `truth` (H, W). Each pixel goes
    to its arg-max group; each group takes the most frequent non-ignored true label among its
    pixels. The result scores what the grouping alone would allow if every group were named
    perfectly (an upper bound for the group-to-class step)."""
    groups, counts = group_label_counts(assignment, truth, n_classes, ignore_index)
    majority = counts.argmax(axis=1)
    return majority[groups]


def group_label_counts(assignment: np.ndarray, truth: np.ndarray, n_classes: int,
                       ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's arg-max group (H, W) and, per group, how many of its non-ignored pixels
    carry each true label (K, n_classes). `assignment` is (K, H, W) at the resolution of `truth`."""
    groups = np.asarray(assignment).argmax(axis=0)
    truth = np.asarray(truth)
    k = assignment.shape[0]
    keep = truth != ignore_index
    counts = np.bincount(groups[keep] * n_classes + truth[keep].astype(np.int64),
                         minlength=k * n_classes).reshape(k, n_classes)
    return groups, counts
