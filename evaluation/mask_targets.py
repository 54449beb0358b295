"""What the cross-image mask-consistency loss trains on, measured against the truth: for pairs
of images that share a labelled class, which of the image's groups the loss keeps, which of the
partner's masks it matches them to, and how much of each lies on the shared object.

The pairs go through the model's own `mask_inputs` and the loss's own `pairs`, so the numbers
are those of what training compares, for each way of matching (`MaskConsistencyLoss.matching`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.training.losses.mask_consistency import MATCHINGS, MaskConsistencyLoss


@dataclass
class LabelledPair:
    """Two RGB images (H, W, 3 uint8) with their label maps (H, W class indices), the class they
    share and its name (what the shared-entity prompt says)."""
    image: np.ndarray
    label: np.ndarray
    partner_image: np.ndarray
    partner_label: np.ndarray
    shared_class: int
    shared_name: str


def _images(model, arrays: list[np.ndarray]) -> torch.Tensor:
    """Images resized to the model's training size and normalised as in training."""
    size = int(model.image_size)
    x = torch.stack([torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1) for a in arrays]).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(model.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def _object_share(labels: list[np.ndarray], classes: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(P, N): the share of each cell of `grid` that is the pair's shared class."""
    onehot = torch.stack([torch.from_numpy((lab == c).astype(np.float32)) for lab, c in zip(labels, classes)])
    return F.adaptive_avg_pool2d(onehot[:, None], grid)[:, 0].flatten(1)


@torch.no_grad()
def mask_target_quality(model, pairs: Iterable[LabelledPair], *, batch_size: int = 32,
                        template: str = "a photo of a {}.", keep_groups: int | None = None,
                        matchings: tuple[str, ...] = MATCHINGS) -> dict[str, dict[str, float]]:
    """Per matching, averaged over every kept group of every pair:
    kept_on_object: share of the cells the kept group holds (arg-max) that are the shared object
    in the image; target_precision and target_recall: share of the matched target that is the
    shared object in the partner, and of that object the target covers; target_empty: share of
    kept groups matched to an empty target; student_precision: share of the kept group's soft
    mask on the partner that lies on the shared object. `pairs` counts the pairs measured.
    `keep_groups`: the groups kept per image (default: the model's `mask_keep_groups`)."""
    if not hasattr(model, "mask_inputs"):
        raise TypeError("the model has no cross-image masks to measure")
    cfg = model.cfg
    sums: dict[str, dict[str, list[float]]] = {m: {} for m in matchings}
    keep = cfg.mask_keep_groups if keep_groups is None else keep_groups
    losses = {m: MaskConsistencyLoss(keep, cfg.mask_target_threshold, m) for m in matchings}
    n_pairs = 0
    batch: list[LabelledPair] = []

    def measure(chunk: list[LabelledPair]) -> None:
        p = len(chunk)
        images = _images(model, [c.image for c in chunk] + [c.partner_image for c in chunk])
        prompts = model.tokenizer([template.format(c.shared_name) for c in chunk] * 2, padding=True,
                                  truncation=True, max_length=cfg.max_text_length, return_tensors="pt")
        rows = torch.cat([torch.arange(p, 2 * p), torch.arange(p)])
        encoding = model.encode_image(images)
        student, teacher, relevance, _, partner_relevance = model.mask_inputs(encoding, {
            "image": images, "partner_index": rows, "has_partner": torch.ones(2 * p, dtype=torch.bool),
            "shared_ids": prompts["input_ids"], "shared_mask": prompts["attention_mask"]})
        grid = tuple(encoding.inputs.grid) if cfg.mask_grid == "tokens" else tuple(encoding.assignment.shape[-2:])
        labels = [c.label for c in chunk] + [c.partner_label for c in chunk]
        classes = [c.shared_class for c in chunk] * 2
        own = _object_share(labels, classes, grid)  # (2P, N): the object in each row's image
        partner = own[rows]
        # each row's arg-max group map on the same grid as the masks
        assignment = F.adaptive_avg_pool2d(encoding.assignment.float(), grid).flatten(2).argmax(dim=1)  # (2P, N)
        for matching, loss in losses.items():
            keep, kept_student, target = loss.pairs(student, teacher, relevance, partner_relevance)
            out = sums[matching]
            for i in range(2 * p):
                for j, k in enumerate(keep[i].tolist()):
                    held = assignment[i] == k
                    if held.any():
                        out.setdefault("kept_on_object", []).append(float(own[i][held].mean()))
                    t = target[i, j]
                    empty = float(t.sum() == 0)
                    out.setdefault("target_empty", []).append(empty)
                    if not empty:
                        out.setdefault("target_precision", []).append(float((t * partner[i]).sum() / t.sum()))
                        obj = partner[i].sum()
                        if obj > 0:
                            out.setdefault("target_recall", []).append(float((t * partner[i]).sum() / obj))
                    s = kept_student[i, j].float()
                    out.setdefault("student_precision", []).append(float((s * partner[i]).sum() / s.sum().clamp_min(1e-6)))

    for pair in pairs:
        batch.append(pair)
        n_pairs += 1
        if len(batch) == batch_size:
            measure(batch)
            batch = []
    if batch:
        measure(batch)
    if n_pairs == 0:
        raise ValueError("no pairs to measure")
    return {m: {"pairs": float(n_pairs), **{k: float(np.mean(v)) for k, v in sums[m].items()}} for m in matchings}
