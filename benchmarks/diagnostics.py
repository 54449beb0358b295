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


def model_images(model, images) -> torch.Tensor:
    """RGB images (each H x W x 3, uint8: arrays or PIL images) as one batch resized to the
    model's training size and normalised as in training."""
    size = int(model.image_size)
    mean = torch.tensor(model.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1) for im in images]).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


def _encoded(model, dataset: SegmentationDataset, n: int, batch_size: int):
    """(items, encoding) batch by batch: each image resized to the model's training size."""
    for start in range(0, n, batch_size):
        items = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
        yield items, model.encode_image(model_images(model, [im for im, _ in items]))


def _object_groups(assignment: torch.Tensor, label: np.ndarray, dataset: SegmentationDataset):
    """(distinct arg-max groups, [(group, majority class)] of the groups whose pixels are mostly
    an object): groups holding no labelled pixel, or mostly background, are left out."""
    maps = F.interpolate(assignment[None].float(), size=label.shape, mode="nearest")[0].numpy()
    groups, counts = group_label_counts(maps, label, len(dataset.classes))
    objects = []
    for k in np.flatnonzero(counts.sum(axis=1)):  # groups holding a non-ignored pixel
        majority = int(counts[k].argmax())
        if not (dataset.has_background and majority == 0):
            objects.append((int(k), majority))
    return len(np.unique(groups)), objects


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
    n = len(dataset) if limit is None else min(limit, len(dataset))
    named = with_object = right_groups = object_groups = groups_seen = 0
    for items, out in _encoded(model, dataset, n, batch_size):
        image_best = (F.normalize(out.embedding.float(), dim=-1) @ classes.T).argmax(-1) + first_class  # (B,)
        group_best = (F.normalize(out.group_embeddings.float(), dim=-1) @ classes.T).argmax(-1) + first_class  # (B, K)
        for j, (_, label) in enumerate(items):
            present = set(np.unique(label)) - {IGNORE_INDEX} - ({0} if dataset.has_background else set())
            if present:
                with_object += 1
                named += int(int(image_best[j]) in present)
            distinct, objects = _object_groups(out.assignment[j], label, dataset)
            groups_seen += distinct
            object_groups += len(objects)
            right_groups += sum(int(group_best[j, k]) == majority for k, majority in objects)
    return {"image_top1_present": named / max(with_object, 1),
            "group_accuracy": right_groups / object_groups if object_groups else float("nan"),
            "groups_per_image": groups_seen / max(n, 1)}


@torch.no_grad()
def _group_features(model, dataset: SegmentationDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The features (before the projector) of every object group, and its majority class."""
    features, labels = [], []
    for items, out in _encoded(model, dataset, len(dataset), batch_size):
        for j, (_, label) in enumerate(items):
            for k, majority in _object_groups(out.assignment[j], label, dataset)[1]:
                features.append(out.groups[j, k].float())
                labels.append(majority)
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.stack(features), torch.tensor(labels)


def group_probe(model, fit: SegmentationDataset, test: SegmentationDataset, *, steps: int = 300,
                weight_decay: float = 1e-3, batch_size: int = 64) -> dict[str, float]:
    """Is the class in the groups at all? A linear classifier (multinomial logistic regression
    on standardised features, full-batch Adam) fitted on the object groups of `fit` and scored
    on those of `test`. Next to `group_accuracy` it splits a naming failure in two: groups whose
    features do not carry their object's class (a low probe), or class prompts that do not match
    features which do (a probe well above the prompts)."""
    x_fit, y_fit = _group_features(model, fit, batch_size)
    x_test, y_test = _group_features(model, test, batch_size)
    if not len(y_fit) or not len(y_test):
        return {"probe_group_accuracy": float("nan"), "probe_fit_groups": len(y_fit), "probe_test_groups": len(y_test)}
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    n_classes = len(fit.classes)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(x_fit.shape[1], n_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(x_fit @ weight + bias, y_fit) + weight_decay * weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float(((x_test @ weight + bias).argmax(-1) == y_test).float().mean())
    return {"probe_group_accuracy": accuracy, "probe_fit_groups": len(y_fit), "probe_test_groups": len(y_test)}
