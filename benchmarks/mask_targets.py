"""What the cross-image mask-consistency loss trains on, measured against the truth: for pairs
of images that share a labelled class, which of the image's groups the loss keeps, which of the
partner's masks it matches them to, and how much of each lies on the shared object.

The pairs go through the model's own `mask_inputs` and the loss's own `pairs`, so the numbers
are those of what training compares, under each setting of the loss (`Setting`).

`ovseg bench mask-targets` measures it on the synthetic world, where the truth of every training
image can be drawn again: the pairs are the curated cross-image pairs of an `ovseg bench synthetic`
folder (DATA/pairs.parquet); each training image is rendered again from the world's seed with its
label map, unaugmented."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.benchmarks.diagnostics import model_images
from ovseg.benchmarks.results import Section
from ovseg.training.losses.mask_consistency import MaskConsistencyLoss


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


def _object_share(labels: list[np.ndarray], classes: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """(P, N): the share of each cell of `grid` that is the pair's shared class."""
    onehot = torch.stack([torch.from_numpy((lab == c).astype(np.float32)) for lab, c in zip(labels, classes)])
    return F.adaptive_avg_pool2d(onehot[:, None], grid)[:, 0].flatten(1)


@dataclass(frozen=True)
class Setting:
    """One way the loss could run: the grid the masks are compared on (`model.mask_grid`), the
    groups kept per image (`model.mask_keep_groups`) and the matching (`model.mask_matching`)."""
    grid: str
    keep: int
    matching: str


def settings_of(model) -> list[Setting]:
    """The model's own setting and, when it differs, the paper's form of the loss (dice matching
    on the assignment grid, 4 groups kept: the public code's)."""
    cfg = model.cfg
    own = Setting(cfg.mask_grid, cfg.mask_keep_groups, cfg.mask_matching)
    paper = Setting("assignment", 4, "dice")
    return [own] if own == paper else [paper, own]


@torch.no_grad()
def mask_target_quality(model, pairs: Iterable[LabelledPair], settings: list[Setting] | None = None, *,
                        batch_size: int = 32, template: str = "a photo of a {}.") -> dict[Setting, dict[str, float]]:
    """Per setting (default: `settings_of(model)`), averaged over every kept group of every pair
    in both directions: kept_on_object: share of the cells the kept group holds (arg-max) that
    are the shared object in the image; target_precision and target_recall: share of the matched
    target that is the shared object in the partner, and of that object the target covers;
    target_empty: share of kept groups matched to an empty target; student_precision: share of
    the kept group's soft mask on the partner that lies on the shared object. `pairs` counts
    the pairs measured."""
    if not hasattr(model, "mask_inputs"):
        raise TypeError("the model has no cross-image masks to measure")
    settings = settings_of(model) if settings is None else list(settings)
    base = model.cfg
    sums: dict[Setting, dict[str, list[float]]] = {s: {} for s in settings}
    losses = {s: MaskConsistencyLoss(s.keep, base.mask_target_threshold, s.matching) for s in settings}
    n_pairs = 0
    batch: list[LabelledPair] = []

    def measure(chunk: list[LabelledPair]) -> None:
        p = len(chunk)
        images = model_images(model, [c.image for c in chunk] + [c.partner_image for c in chunk])
        prompts = model.tokenizer([template.format(c.shared_name) for c in chunk] * 2, padding=True,
                                  truncation=True, max_length=base.max_text_length, return_tensors="pt")
        rows = torch.cat([torch.arange(p, 2 * p), torch.arange(p)])
        encoding = model.encode_image(images)
        labels = [c.label for c in chunk] + [c.partner_label for c in chunk]
        classes = [c.shared_class for c in chunk] * 2
        for grid_name in dict.fromkeys(s.grid for s in settings):
            student, teacher, relevance, _, partner_relevance = model.mask_inputs(encoding, {
                "image": images, "partner_index": rows, "has_partner": torch.ones(2 * p, dtype=torch.bool),
                "shared_ids": prompts["input_ids"], "shared_mask": prompts["attention_mask"]}, mask_grid=grid_name)
            grid = tuple(encoding.inputs.grid) if grid_name == "tokens" else tuple(encoding.assignment.shape[-2:])
            own = _object_share(labels, classes, grid)  # (2P, N): the object in each row's image
            partner = own[rows]
            # each row's arg-max group map on the same grid as the masks
            assignment = F.adaptive_avg_pool2d(encoding.assignment.float(), grid).flatten(2).argmax(dim=1)
            for setting in (s for s in settings if s.grid == grid_name):
                keep, kept_student, target = losses[setting].pairs(student, teacher, relevance, partner_relevance)
                _accumulate(sums[setting], keep, kept_student, target, own, partner, assignment)

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
    return {s: {"pairs": float(n_pairs), **{k: float(np.mean(v)) for k, v in sums[s].items()}} for s in settings}


def _accumulate(out: dict[str, list[float]], keep: torch.Tensor, student: torch.Tensor, target: torch.Tensor,
                own: torch.Tensor, partner: torch.Tensor, assignment: torch.Tensor) -> None:
    """Add every kept group's measures (see `mask_target_quality`) to `out`."""
    for i in range(keep.shape[0]):
        for j, k in enumerate(keep[i].tolist()):
            held = assignment[i] == k
            if held.any():
                out.setdefault("kept_on_object", []).append(float(own[i][held].mean()))
            t = target[i, j]
            empty = float(t.sum() == 0)
            out.setdefault("target_empty", []).append(empty)
            if not empty:
                on_object = float((t * partner[i]).sum())
                out.setdefault("target_precision", []).append(on_object / float(t.sum()))
                if partner[i].sum() > 0:
                    out.setdefault("target_recall", []).append(on_object / float(partner[i].sum()))
            s = student[i, j].float()
            out.setdefault("student_precision", []).append(float((s * partner[i]).sum() / s.sum().clamp_min(1e-6)))


def synthetic_pairs(out: Path, n: int, seed: int = 0) -> Iterator:
    """Up to `n` of the folder's cross-image pairs (drawn with `seed`) whose shared entity is a
    class drawn in both images, as `LabelledPair`s."""
    import polars as pl

    from ovseg.curation import synthetic as syn
    from ovseg.curation.contract import MANIFEST_DIR, PAIRS_FILE

    world, data = out / "world", out / "data"
    for needed in (world / "world.json", data / PAIRS_FILE, data / MANIFEST_DIR):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: run `ovseg bench synthetic --out {out}` first")
    cfg = syn.load_config(world)
    classes = syn.classes(cfg)
    # the manifest's URL names the world's image file, whose number is its index in the train split
    manifest = pl.read_parquet(data / MANIFEST_DIR).select(
        "sample_id", pl.col("url").str.extract(r"(\d+)\.\w+$").cast(pl.Int64).alias("index"))
    index = dict(zip(manifest["sample_id"].to_list(), manifest["index"].to_list()))
    pairs = pl.read_parquet(data / PAIRS_FILE)
    pairs = pairs.filter(pl.col("entity").is_in(classes[1:]))
    pairs = pairs.sample(min(n, pairs.height), seed=seed, shuffle=True)

    def drawn(sample_id: int):
        scene, image, depth = syn.make_sample(cfg, "train", index[sample_id])
        return image, syn.label_map(scene, depth, classes, border=False)

    for sample_id, partner_id, entity in pairs.select("sample_id", "partner_id", "entity").iter_rows():
        if sample_id not in index or partner_id not in index:
            continue
        (image, label), (p_image, p_label) = drawn(sample_id), drawn(partner_id)
        shared = classes.index(entity)
        if (label == shared).any() and (p_label == shared).any():
            yield LabelledPair(image, label, p_image, p_label, shared, entity)


def report(results: dict, command: str = "ovseg bench mask-targets") -> Section:
    """The results section `mask-targets`: one row per checkpoint and setting of the loss (grid,
    groups kept, matching)."""
    section = Section("mask-targets", "What the mask loss trains on (`ovseg bench mask-targets`)", command)
    section.text("For pairs of training images that share a class (both directions), the groups the mask loss "
                 "keeps (the image's most related to the shared entity) and the partner's masks it matches them "
                 "to, against the truth: how much of a kept group is the shared object in its own image, how much "
                 "of its target is the object in the partner (precision) and how much of the object the target "
                 "covers (recall), and how much of the kept group's mask on the partner lies on the object. "
                 "Each checkpoint is measured under its own settings and under the paper's form of the loss "
                 "(assignment grid, 4 groups, dice matching).")

    def pct(m: dict, key: str) -> str:
        return f"{100 * m[key]:.1f}%" if key in m else "-"

    keys = ("kept_on_object", "target_precision", "target_recall", "target_empty", "student_precision")
    return section.table(
        ["checkpoint", "grid", ("groups kept", "right", "d"), "matching", ("pairs", "right", "d"),
         ("kept group on the object", "right"), ("target precision", "right"), ("target recall", "right"),
         ("empty targets", "right"), ("student mask on the object", "right")],
        [[name, setting.grid, setting.keep, setting.matching, int(m["pairs"]), *(pct(m, k) for k in keys)]
         for name, by_setting in results.items() for setting, m in by_setting.items()])
