"""`ovseg bench batch-plan`: the official global batches on 8, 4 and 1 GPUs of 24, 40 and 80 GB:
the micro-batch that fits, the micro-batches per step, and the hours for the official epochs of
CC4M. One row is measured (the `train-cuda` section's `paper` row: its batch per GPU, images/s
and peak memory); the others are projected from it, and marked so:

- memory: a fixed part (the trainable parameters' weights, gradients and AdamW's two moments in
  float32, and the frozen momentum encoder's weights, from the `model` section's parameter
  counts) plus a part per sample, the measured peak's remainder over its batch; a micro-batch
  fits when it stays under `training.batching.HEADROOM` of the card's memory, as the probe
  that `ovseg train` runs asks;
- time: the measured images/s per GPU, times the GPUs, over the epochs of CC4M (taken as 4
  million samples); a step in k > 1 cached micro-batches does about one extra forward pass, a
  third of a forward and backward, so it is counted 4/3 as long.
"""

from __future__ import annotations

from ovseg.benchmarks.measure import machine
from ovseg.benchmarks.results import RESULTS, Section, load

GIB = 2**30
CC4M = 4_000_000
CACHED_STEP_COST = 4 / 3
# (what, global batch, epochs): the official scripts' batches and lengths
OFFICIAL = (("OVSegmentor stage 1", 2048, 30), ("OVSegmentor stage 2", 1024, 10), ("GroupViT", 4096, 30))
GPUS = (8, 4, 1)
MEMORY_GB = (24, 40, 80)


def _measured_row(results) -> dict:
    """The `paper` row of the stored `train-cuda` section and the parameter counts of `model`."""
    train, model = load("train-cuda", results), load("model", results)
    if train is None or model is None:
        raise ValueError("batch-plan projects from the stored train-cuda and model sections: run "
                         "`ovseg bench train --device cuda --presets paper` and `ovseg bench model` first")
    table = next(t for t in train.tables() if any(r[0] == "paper" for r in t["rows"]))
    names = [c["name"] for c in table["columns"]]
    row = dict(zip(names, next(r for r in table["rows"] if r[0] == "paper")))
    counts = {r[0]: r[1] for t in model.tables() for r in t["rows"] if r and r[0] in ("trainable", "total")}
    return {"batch": int(row["batch"]), "images_per_s": float(row["images/s/GPU"]),
            "peak_gib": float(row["peak memory (GiB)"]), "gpu": train.machine.get("gpu", "a GPU"),
            "measured": train.measured, "trainable": counts["trainable"], "frozen": counts["total"] - counts["trainable"]}


def project(basis: dict) -> list[dict]:
    """One row per official batch, GPU count and card memory."""
    from ovseg.training.batching import HEADROOM

    fixed = (basis["trainable"] * 16 + basis["frozen"] * 4) / GIB
    per_sample = (basis["peak_gib"] - fixed) / basis["batch"]
    rows = []
    for what, global_batch, epochs in OFFICIAL:
        for gpus in GPUS:
            for memory in MEMORY_GB:
                usable = memory * 1e9 / GIB * HEADROOM
                per_gpu = global_batch // gpus
                fits = [d for d in range(1, per_gpu + 1) if per_gpu % d == 0 and fixed + d * per_sample <= usable]
                micro = max(fits) if fits else None
                k = per_gpu // micro if micro else None
                hours = None
                if micro:
                    rate = basis["images_per_s"] * gpus / (CACHED_STEP_COST if k > 1 else 1.0)
                    hours = epochs * CC4M / rate / 3600
                rows.append({"what": what, "global_batch": global_batch, "epochs": epochs, "gpus": gpus,
                             "memory_gb": memory, "per_gpu": per_gpu, "micro_batch": micro, "k": k, "hours": hours})
    return rows


def benchmark_batch_plan(results=RESULTS, command: str = "ovseg bench batch-plan") -> tuple[Section, dict]:
    basis = _measured_row(results)
    rows = project(basis)
    fixed = (basis["trainable"] * 16 + basis["frozen"] * 4) / GIB
    section = Section("batch-plan", "The official batches on fewer or smaller GPUs (`ovseg bench batch-plan`)",
                      command, machine=machine())
    section.text(
        f"Projected from one measured row: the `paper` preset at {basis['batch']} images per GPU on {basis['gpu']} "
        "(section `train-cuda`, on the revision of the model at its date): "
        f"{basis['images_per_s']:.0f} images/s per GPU, {basis['peak_gib']:.2f} GiB peak. Memory is taken as {fixed:.1f} GiB fixed (float32 weights, gradients "
        f"and AdamW moments of the trainable parameters; the frozen momentum encoder's weights) plus "
        f"{(basis['peak_gib'] - fixed) / basis['batch'] * 1024:.0f} MiB per sample; the micro-batch is the largest "
        "divisor of the batch per GPU that stays under the probe's share of the card. Hours are for the given "
        "epochs of CC4M (4 million samples) at the measured rate per GPU, a step of k > 1 cached micro-batches "
        "counted 4/3 as long (one extra forward pass). A slower card than the measured one takes longer in "
        "proportion: `ovseg bench train --device cuda --presets paper` measures yours. `ovseg train` probes "
        "the micro-batch itself (`train.stages.N.global_batch`, docs/training.md).")
    section.text("Measured (the basis; one step of one batch, no accumulation):")
    section.table(["GPU", ("batch per GPU", "right", "d"), ("images/s per GPU", "right", ".0f"),
                   ("peak memory (GiB)", "right", ".2f")],
                  [[basis["gpu"], basis["batch"], basis["images_per_s"], basis["peak_gib"]]])
    section.notes.append(f"the measured row is the `train-cuda` section's of {basis['measured']}")
    section.text("Projected:")
    section.table(["global batch", ("epochs", "right", "d"), ("GPUs", "right", "d"), ("GB each", "right", "d"),
                   ("per GPU", "right", "d"), ("micro-batch", "right"), ("k", "right"), ("hours", "right", ".1f")],
                  [[f"{r['global_batch']:,} ({r['what']})", r["epochs"], r["gpus"], r["memory_gb"], r["per_gpu"],
                    r["micro_batch"] if r["micro_batch"] else "does not fit", r["k"] if r["k"] else "",
                    r["hours"]] for r in rows])
    return section, {"basis": basis, "rows": rows}
