"""`ovseg bench mask-targets`: what the cross-image mask-consistency loss trains on, on the
synthetic world, where the truth of every training image can be drawn again.

The pairs are the curated cross-image pairs of an `ovseg bench synthetic` folder (DATA/pairs.parquet);
each training image is rendered again from the world's seed with its label map, unaugmented."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator


def synthetic_pairs(out: Path, n: int, seed: int = 0) -> Iterator:
    """Up to `n` of the folder's cross-image pairs (drawn with `seed`) whose shared entity is a
    class drawn in both images, as `LabelledPair`s."""
    import polars as pl

    from ovseg.curation import synthetic as syn
    from ovseg.evaluation.mask_targets import LabelledPair

    world, data = out / "world", out / "data"
    for needed in (world / "world.json", data / "pairs.parquet", data / "manifest"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: run `ovseg bench synthetic --out {out}` first")
    cfg = syn.load_config(world)
    classes = syn.classes(cfg)
    # the manifest's URL names the world's image file, whose number is its index in the train split
    manifest = pl.read_parquet(data / "manifest").select(
        "sample_id", pl.col("url").str.extract(r"(\d+)\.\w+$").cast(pl.Int64).alias("index"))
    index = dict(zip(manifest["sample_id"].to_list(), manifest["index"].to_list()))
    pairs = pl.read_parquet(data / "pairs.parquet")
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


def report(results: dict, machine: str) -> str:
    """Markdown: one row per checkpoint and setting of the loss (grid, groups kept, matching)."""
    lines = [machine, "",
             "For pairs of training images that share a class (both directions), the groups the mask loss "
             "keeps (the image's most related to the shared entity) and the partner's masks it matches them "
             "to, against the truth: how much of a kept group is the shared object in its own image, how much "
             "of its target is the object in the partner (precision) and how much of the object the target "
             "covers (recall), and how much of the kept group's mask on the partner lies on the object. "
             "Each checkpoint is measured under its own settings and under the paper's form of the loss "
             "(assignment grid, 4 groups, dice matching).", "",
             "| checkpoint | grid | groups kept | matching | pairs | kept group on the object | target precision "
             "| target recall | empty targets | student mask on the object |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]

    def pct(m: dict, key: str) -> str:
        return f"{100 * m[key]:.1f}%" if key in m else "-"

    for name, by_setting in results.items():
        for setting, m in by_setting.items():
            lines.append(f"| {name} | {setting.grid} | {setting.keep} | {setting.matching} | {int(m['pairs'])} "
                         f"| {pct(m, 'kept_on_object')} | {pct(m, 'target_precision')} | {pct(m, 'target_recall')} "
                         f"| {pct(m, 'target_empty')} | {pct(m, 'student_precision')} |")
    return "\n".join(lines) + "\n"
