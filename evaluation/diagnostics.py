"""Diagnostics of what a model has learnt, beyond mIoU: does the image embedding name a present
class, do the groups split the image, and does each group carry the class of what it covers.

Every image is resized to the model's training size and goes through the model in one window
(the synthetic world is drawn at that size), so each group's class and its pixels are those of
one forward pass."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.evaluation.datasets import SegmentationDataset
from ovseg.evaluation.metrics import IGNORE_INDEX, group_label_counts
from ovseg.evaluation.segmenter import PAPER_TEMPLATE, ZeroShotSegmenter


@torch.no_grad()
def group_diagnostics(model, dataset: SegmentationDataset, *, limit: int | None = None, batch_size: int = 64,
                      template: str = PAPER_TEMPLATE) -> dict[str, float]:
    """image_top1_present: share of images with an object whose image embedding's best class is
    present; group_accuracy: share of groups whose pixels are mostly an object (not background)
    whose best class is that object's class (NaN when no group is mostly an object: then every
    group covers mostly background); groups_per_image: distinct arg-max groups per image."""
    first_class = 1 if dataset.has_background else 0
    # the segmenter's class embeddings (prompts through the text encoder), on the CPU
    classes = ZeroShotSegmenter(model, dataset.prompt_classes, templates=(template,)).class_embeddings()  # (C, D)
    size = int(model.image_size)
    mean = torch.tensor(model.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std).view(1, 3, 1, 1)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    named = with_object = right_groups = object_groups = groups_seen = 0
    for start in range(0, n, batch_size):
        items = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
        images = torch.stack([torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1) for im, _ in items]).float() / 255
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        out = model.encode_image((images - mean) / std)
        image_best = (F.normalize(out.embedding.float(), dim=-1) @ classes.T).argmax(-1) + first_class  # (B,)
        group_best = (F.normalize(out.group_embeddings.float(), dim=-1) @ classes.T).argmax(-1) + first_class  # (B, K)
        for j, (_, label) in enumerate(items):
            assignment = F.interpolate(out.assignment[j:j + 1].float(), size=label.shape, mode="nearest")[0].numpy()
            groups, counts = group_label_counts(assignment, label, len(dataset.classes))
            present = set(np.unique(label)) - {IGNORE_INDEX} - ({0} if dataset.has_background else set())
            if present:
                with_object += 1
                named += int(int(image_best[j]) in present)
            groups_seen += len(np.unique(groups))
            for k in np.flatnonzero(counts.sum(axis=1)):  # groups holding a non-ignored pixel
                majority = int(counts[k].argmax())
                if dataset.has_background and majority == 0:
                    continue
                object_groups += 1
                right_groups += int(int(group_best[j, k]) == majority)
    return {"image_top1_present": named / max(with_object, 1),
            "group_accuracy": right_groups / object_groups if object_groups else float("nan"),
            "groups_per_image": groups_seen / max(n, 1)}
