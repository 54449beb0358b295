"""Does a model learn the world, or the images it was trained on? (`ovseg bench heldout`)

Each checkpoint's training losses (those of the stage it was saved in, computed by the model's
own training forward: augmentation, Gumbel noise and stochastic depth as in training, no
gradient) on batches of its own training images and on batches of images it never saw, drawn
from the same synthetic world with another seed and curated and tokenised the same way. A model
that learns the world scores both alike; one that memorises its training set scores its own
images far better. Chance levels: the contrastive loss of a model that cannot tell the batch's
images apart is log(batch); the entity loss of one that reads nothing of the image is the
text-only floor (`ovseg bench grouping-dynamics`' `...-text-only` run)."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

from ovseg.benchmarks.results import Section

HELDOUT_SEED_OFFSET = 2000  # the held-out world's seed: the training world's plus this


def heldout_world_config(prepared: dict, n_images: int):
    """The `WorldConfig` of a world like the one `prepared` (an `ovseg bench synthetic` folder's
    prepared.json) was drawn from, with `n_images` training images and another seed."""
    from ovseg.curation.synthetic import WorldConfig

    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    held = {k: v for k, v in prepared["world"].items() if k in fields}
    held["shapes"] = tuple(held.get("shapes", WorldConfig.shapes))
    return WorldConfig(**{**held, "n_train": n_images, "seed": held.get("seed", 0) + HELDOUT_SEED_OFFSET})


def stage_losses(checkpoint: Path, data_dir: Path, batches: int, seed: int = 0) -> dict[str, float]:
    """The mean over `batches` batches of DATA of each training loss of `checkpoint`'s stage, at
    the stage's batch size; the batches are drawn by `seed`, the same ones for every checkpoint."""
    import torch

    from ovseg.training import checkpoint as ckpt
    from ovseg.training import distributed as dist_utils
    from ovseg.training.engine import setup_run, step_batches

    cfg = ckpt.config_from_state(ckpt.load(checkpoint))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=str(data_dir), num_workers=0),
                              train=dataclasses.replace(cfg.train, seed=seed))
    info = dist_utils.setup("cpu")
    sums: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            run = setup_run(cfg, Path(scratch), info, init=Path(checkpoint))
            run.model.train()  # the training forward: its noise, dropout and stochastic depth
            micro = step_batches(run)
            torch.manual_seed(seed)
            with torch.no_grad():
                for _ in range(batches):
                    step = next(micro)
                    for batch in step:
                        for name, value in run.train_model(batch).items():
                            sums[name] = sums.get(name, 0.0) + float(value) / (batches * len(step))
            batch_size = run.stage.batch_size or run.cfg.train.batch_size
    finally:
        dist_utils.teardown()
    return {**sums, "batch_size": batch_size, "stage": cfg.train.stage}


def report(rows: list[dict], n_heldout: int, batches: int, command: str = "ovseg bench heldout",
           tag: str = "") -> Section:
    """The section: one row per checkpoint and loss, its value on the training and the held-out
    images and the gap."""
    section = Section("heldout" + (f"-{tag}" if tag else ""),
                      "Training losses on the training images and on unseen ones (`ovseg bench heldout`)"
                      + (f", study `{tag}`" if tag else ""), command)
    section.text(
        "Each checkpoint's training losses (of the stage it was saved in; the training forward with its "
        f"augmentation and noise, no gradient), the mean over {batches} batches of its own training images and "
        f"over {batches} batches of {n_heldout:,} unseen images of the same world (another seed, curated and "
        "tokenised the same way). A model that learns the world scores both alike; one that memorises its "
        "training images scores them far better. Chance: the contrastive loss of a model that cannot tell the "
        "batch's images apart is log(batch); the entity loss of one that reads nothing of the images is the "
        "text-only floor (`ovseg bench grouping-dynamics`, the `...-text-only` run).")
    table = []
    for row in rows:
        for name in sorted(k for k in row["train"] if k not in ("loss", "batch_size", "stage")):
            seen, unseen = row["train"][name], row["heldout"][name]
            table.append([row["name"], str(row["train"]["stage"]), str(row["train"]["batch_size"]), name,
                          f"{seen:.3f}", f"{unseen:.3f}", f"{unseen - seen:+.3f}"])
    section.table(["checkpoint", ("stage", "right"), ("batch", "right"), "loss", ("training images", "right"),
                   ("unseen images", "right"), ("gap", "right")], table)
    chance = sorted({row["train"]["batch_size"] for row in rows})
    section.text("log(batch): " + ", ".join(f"{math.log(b):.2f} at batch {b}" for b in chance) + ".")
    return section


def measure(checkpoints: dict[str, Path], train_data: Path, heldout_data: Path, batches: int,
            echo=print) -> list[dict]:
    """Both sets of losses for every named checkpoint."""
    rows = []
    for name, path in checkpoints.items():
        row = {"name": name, "train": stage_losses(path, train_data, batches),
               "heldout": stage_losses(path, heldout_data, batches)}
        echo(f"{name}: " + json.dumps({k: [round(row['train'][k], 3), round(row['heldout'][k], 3)]
                                       for k in row["train"] if k not in ("batch_size", "stage")}))
        rows.append(row)
    return rows
