"""The synthetic quality benchmark (`ovseg bench synthetic`): how much each of the paper's proxy
tasks adds, at equal training on the same data.

Variants: contrastive only (the GroupViT-style baseline), + masked entity completion (the
preset's stage-1 losses), and the full method (+ cross-image mask consistency in a second stage,
the preset's stage-2 losses). Each is trained to step budgets (any machine reproduces them; the
minutes each took are reported beside them, with the CPU) or, for exploring, to wall-clock
budgets, with a fixed number of CPU threads, then evaluated on the synthetic test split with the
background threshold chosen on val. Two reference rows give the scale: a random-init model
(chance) and the ceiling the patch grid allows (every patch given its majority true label).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from ovseg.benchmarks.measure import cpu_model, machine, now
from ovseg.benchmarks.results import Blocks, Section

# The losses of each variant's stages: a list, or "preset" for the preset's own stage list
# (train.stages.1.losses / train.stages.2.losses), so that "+ entity" is `synthetic-small`'s
# contrastive + entity + grounding and `synthetic-paper`'s contrastive + entity.
VARIANTS = {
    "contrastive": {"stage1": ["contrastive"], "stage2": None},
    "+ entity": {"stage1": "preset", "stage2": None},
    "+ mask (full)": {"stage1": "preset", "stage2": "preset"},
}
STAGE2_SHARE = 0.3  # of the budget, for the full method


def variant_stages(variant: str, cfg) -> tuple[list[str], list[str] | None]:
    """The losses of `variant`'s stage 1 and stage 2 (None: no stage 2) under the run config `cfg`."""
    spec = VARIANTS[variant]
    stages = cfg.train.stages
    first = stages[0].losses if spec["stage1"] == "preset" else spec["stage1"]
    second = None if spec["stage2"] is None else stages[1].losses if spec["stage2"] == "preset" else spec["stage2"]
    return list(first), None if second is None else list(second)


def model_label(variant: str, cfg) -> str:
    """What a row's model is: its grouping, stem and losses, e.g. `learned grouping (Gumbel,
    hard), linear patches, 2 + 2 blocks; contrastive + entity, then + mask (official)`."""
    m = cfg.model
    if m.grouping == "learned":
        noise = m.assign_noise
        kind = ("soft" if not m.hard_assignment else "Gumbel, hard" if noise == 1
                else "hard, no Gumbel noise" if noise == 0 else f"Gumbel x {noise:g}, hard")
        grouping = f"learned grouping ({kind}" + (", centred logits)" if m.assign_center else ")")
    else:
        grouping = "clustering (no gradient to the assignment)"
    stem = {"linear": "linear patches", "conv": "conv stem", "cnn": "CNN stem"}.get(m.patch_embed, m.patch_embed)
    first, second = variant_stages(variant, cfg)
    named = {"entity": f"entity ({m.decoder} decoder)", "mask": f"mask ({m.mask_form})"}
    losses = " + ".join(named.get(x, x) for x in first)
    if second is not None:
        added = [x for x in second if x not in first]
        losses += ", then + " + " + ".join(named.get(x, x) for x in added) if added else ", then a second stage"
    return f"{grouping}, {stem}, {m.depth_before} + {m.depth_after} blocks; {losses}"


def budget_of(result: dict) -> float:
    """A result's budget: its steps (a step-budget run) or its minutes (a wall-clock one)."""
    return float(result["budget_steps"]) if "budget_steps" in result else result["minutes"]


def _evaluate(world_dir: Path, checkpoint: Path, out: Path, device: str) -> dict:
    from ovseg.evaluation.evaluate import run_evaluation

    result = run_evaluation("synthetic", world_dir / "voc", checkpoint, output_dir=out, split="test",
                            tune_threshold_on="val", device=device, diagnostics=True, save_pictures=4)
    return {"miou": result.metrics.miou, "group_majority_miou": result.group_majority.miou,
            "bg_threshold": result.bg_threshold}


def train_and_evaluate(variant: str, data_dir: Path, world_dir: Path, run_dir: Path, budgets: list[float], seed: int,
                       preset: str = "synthetic-small", overrides: tuple[str, ...] = (), device: str = "cpu",
                       threads: int = 2, done: list[dict] = ()) -> list[dict]:
    """Train one variant and evaluate it (threshold chosen on val) after each of `budgets`
    minutes of training (ascending). The schedule is constant after warm-up (the step limit is
    out of reach), so one run stopped and resumed at each budget is the run a shorter budget
    would have made; evaluation time is not training time. The full method spends the last
    STAGE2_SHARE of each budget in stage 2, started from a copy of stage 1 at that point.
    `done` holds the results of budgets this run already measured (an earlier benchmark with
    fewer budgets): those are kept, and training goes on from the stage-1 checkpoint they left."""
    import shutil

    import torch

    from ovseg.training.config import at_stage, resolve
    from ovseg.training.engine import train

    torch.set_num_threads(threads)
    cfg = resolve(preset, overrides=[f"data.data_dir={data_dir}", f"train.seed={seed}", "train.stages.1.steps=1000000",
                                     "train.stages.2.steps=1000000", f"train.device={device}", *overrides])
    stage1_losses, stage2_losses = variant_stages(variant, cfg)
    spec = {"stage1": stage1_losses, "stage2": stage2_losses}
    share = STAGE2_SHARE if spec["stage2"] else 0.0
    stage1_dir = run_dir / "stage1"
    results, trained = [], 0.0
    measured = {r["minutes"]: r for r in done}
    for budget in sorted(budgets):
        if budget in measured:
            results.append(measured[budget])
            trained = budget * (1 - share)
            continue
        if results:  # going on from a budget measured earlier: its stage-1 checkpoint must be that point
            _check_resumes_at(stage1_dir / "last.pt", results[-1]["steps"]["stage1"])
        minutes = budget * (1 - share) - trained
        first = at_stage(cfg, 1, losses=spec["stage1"], train_max_minutes=minutes)
        s1 = train(first, stage1_dir, progress=False)  # resumes from where the last budget stopped
        trained += minutes
        steps = {"stage1": s1["step"]}
        # kept for every variant: stage 2's start, and the model of this budget once the run goes on
        snapshot = checkpoint = run_dir / f"stage1-at-{budget:g}min.pt"
        shutil.copyfile(stage1_dir / "last.pt", snapshot)
        if spec["stage2"]:
            second = at_stage(cfg, 2, losses=spec["stage2"], train_max_minutes=budget * share)
            s2 = train(second, run_dir / f"stage2-{budget:g}min", init=snapshot, progress=False)
            steps["stage2"] = s2["step"]
            checkpoint = run_dir / f"stage2-{budget:g}min" / "last.pt"
        scores = _evaluate(world_dir, checkpoint, run_dir / f"eval-{budget:g}min", device)
        results.append({"variant": variant, "seed": seed, "minutes": budget, "steps": steps, **scores,
                        "measured": now()})
    return results


def _step(checkpoint: Path) -> int:
    from ovseg.training.checkpoint import load

    return load(checkpoint)["step"]


def _check_resumes_at(checkpoint: Path, step: int) -> None:
    found = _step(checkpoint)
    if found != step:
        raise RuntimeError(f"{checkpoint} is at step {found}, but the earlier budget ended at step {step}: "
                           "the run folder does not match its result file; delete both to rerun")


def train_steps_and_evaluate(variant: str, data_dir: Path, world_dir: Path, run_dir: Path, budgets: list[int],
                             seed: int, preset: str = "synthetic-small", overrides: tuple[str, ...] = (),
                             device: str = "cpu", threads: int = 2, done: list[dict] = ()) -> list[dict]:
    """Train one variant to each of `budgets` steps and evaluate it (threshold chosen on val).
    Each budget is its own run (RUN/{N}steps/), on the preset's schedule over exactly N steps
    (the full method: the last STAGE2_SHARE of them in stage 2, from stage 1's end), so a
    budget gives the same model on any machine; the minutes its training took (evaluation not
    counted) and the CPU are recorded beside it. An interrupted run resumes from its last
    checkpoint (its minutes are then the resumed part only, and marked so); `done` holds the
    budgets measured before, which are kept."""
    import torch

    from ovseg.training.config import at_stage, resolve
    from ovseg.training.engine import train

    torch.set_num_threads(threads)
    cfg = resolve(preset, overrides=[f"data.data_dir={data_dir}", f"train.seed={seed}", f"train.device={device}",
                                     "train.max_minutes=null", "train.stages.1.epochs=null", "train.stages.2.epochs=null",
                                     *overrides])  # the budget is in steps, not epochs
    stage1_losses, stage2_losses = variant_stages(variant, cfg)
    measured = {budget_of(r): r for r in done}
    results = []
    for budget in sorted(int(b) for b in budgets):
        if budget in measured:
            results.append(measured[budget])
            continue
        second_steps = round(budget * STAGE2_SHARE) if stage2_losses else 0
        steps = {"stage1": budget - second_steps}
        folder = run_dir / f"{budget}steps"
        first = at_stage(cfg, 1, losses=stage1_losses, steps=steps["stage1"])
        minutes, resumed = _timed_train(train, first, folder / "stage1")
        checkpoint = folder / "stage1" / "last.pt"
        if stage2_losses:
            steps["stage2"] = second_steps
            second = at_stage(cfg, 2, losses=stage2_losses, steps=second_steps)
            more, resumed_too = _timed_train(train, second, folder / "stage2", init=checkpoint)
            minutes, resumed = minutes + more, resumed or resumed_too
            checkpoint = folder / "stage2" / "last.pt"
        scores = _evaluate(world_dir, checkpoint, folder / "eval", device)
        results.append({"variant": variant, "seed": seed, "budget_steps": budget, "steps": steps,
                        "batch_size": cfg.train.stages[0].batch_size or cfg.train.batch_size,
                        "stage2_batch_size": cfg.train.stages[1].batch_size or cfg.train.batch_size,
                        "train_minutes": minutes, "resumed": resumed, "cpu": cpu_model(), "threads": threads,
                        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                        **scores, "measured": now()})
    return results


def _timed_train(train, cfg, run_dir: Path, init: Path | None = None) -> tuple[float, bool]:
    """Run one stage to its end; the minutes its training took, and whether it resumed an
    interrupted run (whose first part's minutes are lost). A stage that finished before is not
    run again: its minutes are read from RUN/minutes.json, written when it finished."""
    record = run_dir / "minutes.json"
    if record.exists():
        held = json.loads(record.read_text())
        return held["minutes"], held["resumed"]
    resumed = (run_dir / "last.pt").exists()
    result = train(cfg, run_dir, init=init, progress=False)
    if result["stop"] != "steps":  # stopped by a signal (or a time limit) and saved: not this budget's model
        raise StageInterrupted(f"{run_dir} stopped at step {result['step']} ({result['stop']}) before its budget; "
                               "rerun the same command to resume it")
    record.write_text(json.dumps({"minutes": result["minutes"], "resumed": resumed}))
    return result["minutes"], resumed


class StageInterrupted(RuntimeError):
    """A stage of a step-budget run stopped before its steps (SIGTERM saves and returns)."""


def check_recipe(out: Path, recipe: dict) -> None:
    """Record the preset and overrides the runs under `out` train with (OUT/recipe.json), or
    refuse another recipe: finished runs are reused, and must be of the recipe asked for. A
    folder from before the record was kept is taken to hold the default recipe, and a record
    without a world style the standard world."""
    from ovseg.training.config import ConfigError

    path = out / "recipe.json"
    if path.exists():
        held = json.loads(path.read_text())
    elif (out / "logs").is_dir():
        held = {"preset": "synthetic-small", "overrides": []}
    else:
        held = recipe
    held, recipe = ({"style": "standard", **r} for r in (held, recipe))
    if held != recipe:
        raise ConfigError(f"{out} holds runs of preset {held['preset']} with overrides {held['overrides']} on the "
                          f"{held['style']} world, not {recipe['preset']} with {recipe['overrides']} on the "
                          f"{recipe['style']} world: pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe))


def random_init(world_dir: Path, out: Path, seed: int, preset: str = "synthetic-small", captions: list[str] = (),
                overrides: tuple[str, ...] = ()) -> dict:
    """A model that never trained: the chance row."""
    import torch

    from ovseg.evaluation.evaluate import run_evaluation
    from ovseg.training.config import resolve, to_dict
    from ovseg.training.model import build_model
    from ovseg.training.tokenizer import tokenizer_to_json, train_wordpiece

    cfg = resolve(preset, overrides=overrides)
    tokenizer = train_wordpiece(captions or ["a photo of a shape"], vocab_size=cfg.data.tokenizer_vocab_size)
    torch.manual_seed(seed)
    model = build_model(cfg.model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "random.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "tokenizer": tokenizer_to_json(tokenizer)}, path)
    result = run_evaluation("synthetic", world_dir / "voc", path, output_dir=out / "eval", split="test",
                            tune_threshold_on="val", device="cpu", diagnostics=True)
    return {"miou": result.metrics.miou, "group_majority_miou": result.group_majority.miou}


def patch_grid_ceiling(world_dir: Path, cells: int) -> float:
    """mIoU of the test labels after each cell of a `cells` x `cells` grid takes its majority
    (non-ignored) label: the best any map drawn at that grid can score."""
    import numpy as np

    from ovseg.evaluation.datasets import load_synthetic
    from ovseg.evaluation.metrics import IGNORE_INDEX, ConfusionMatrix

    data = load_synthetic(world_dir / "voc", split="test")
    n = len(data.classes)
    cm = ConfusionMatrix(n)
    for i in range(len(data)):
        _, label = data.load(i)
        h, w = label.shape
        patch = max(h // cells, 1)
        pred = np.zeros_like(label)
        for y in range(0, h, patch):
            for x in range(0, w, patch):
                block = label[y:y + patch, x:x + patch]
                valid = block[block != IGNORE_INDEX]
                pred[y:y + patch, x:x + patch] = np.bincount(valid, minlength=n).argmax() if valid.size else 0
        cm.update(label, pred)
    return cm.compute().miou


def slot_cores(slot: int, threads: int, parallel: int) -> list[int] | None:
    """The cores that run slot `slot` of `parallel` pins to: its own `threads` of the cores this
    process may use (so that two benchmarks started under `taskset -c 0` and `taskset -c 1` do
    not share a core), or None where the OS cannot pin or there are too few."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < parallel * threads:
        return None
    return allowed[slot * threads:(slot + 1) * threads]


def run_parallel(jobs: list[dict], threads: int, parallel: int, log_dir: Path) -> list[dict]:
    """Run `train_and_evaluate` (or, for a job with "unit": "steps", `train_steps_and_evaluate`)
    jobs as child processes, `parallel` at a time, each limited to
    `threads` CPU threads (and pinned to its own cores where the OS allows). Jobs whose result
    file is already in `log_dir` are read, not rerun, so an interrupted benchmark resumes; a job
    asked for a budget its result file lacks goes on from its last measured budget."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(jobs), [], []
    slot_free = list(range(parallel))
    for job in list(pending):  # a job that finished in an earlier (interrupted) call is not rerun
        done = log_dir / f"{job['name']}.json"
        if done.exists():
            earlier = json.loads(done.read_text())
            if {float(b) for b in job["budgets"]} <= {budget_of(r) for r in earlier}:
                results.extend(r for r in earlier if budget_of(r) in job["budgets"])
                pending.remove(job)
            else:  # longer budgets asked for: the run goes on from where the earlier call left it
                job["done"] = earlier
    while pending or running:
        while pending and slot_free:
            job, slot = pending.pop(0), slot_free.pop(0)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            result_file = log_dir / f"{job['name']}.json"
            args = [sys.executable, "-m", "ovseg.benchmarks.synthetic", json.dumps({**job, "result": str(result_file)})]
            cores = slot_cores(slot, threads, parallel)
            if cores is not None:
                args = ["taskset", "-c", ",".join(map(str, cores)), *args]
            log = open(log_dir / f"{job['name']}.log", "w")
            running.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), slot, result_file, log))
        time.sleep(1)
        for entry in list(running):
            proc, slot, result_file, log = entry
            if proc.poll() is not None:
                running.remove(entry)
                slot_free.append(slot)
                log.close()
                if proc.returncode == 0 and result_file.exists():
                    results.extend(json.loads(result_file.read_text()))
                else:
                    raise RuntimeError(f"job {result_file.stem} failed: see {log.name}")
    return results


def summarise(results: list[dict], chance: dict, ceiling: float, threads: int, grid: int,
              kept: dict | None = None, labels: dict[str, str] | None = None, style: str = "standard",
              n_train: int | None = None) -> list[dict]:
    """The mIoU table's blocks (its introduction, the table, and a note on kept rows); `kept`
    (from `kept_rows`) adds the rows of variants that were not rerun, each named with the date
    of the section they come from; `labels` (from `model_label`) names each variant's model in
    its row. Step-budget results (`train_steps_and_evaluate`) give `N steps` columns whose cells
    carry the minutes the training took; wall-clock results give `N min` columns whose cells
    carry the steps trained."""
    import numpy as np

    kept = kept or {"cells": {}, "measured": {}, "names": {}}
    labels = labels or {}
    by_steps = any("budget_steps" in r for r in results)
    unit = "steps" if by_steps else "min"
    budgets = sorted({budget_of(r) for r in results} | {b for cells in kept["cells"].values() for b in cells})
    times = sorted(r["measured"] for r in results if "measured" in r)
    when = ""
    if times:
        untimed = sum("measured" not in r for r in results)
        when = (f"Results evaluated from {times[0]} to {times[-1]}"
                + (f" ({untimed} reused from before results were timed)" if untimed else "") + "; the runs "
                "of one call share the machine's speed, so steps are given with each cell. ")
    about = ([f"{style} style"] if style != "standard" else []) + ([f"{n_train:,} training images"] if n_train else [])
    world = "Synthetic world" + (f" ({', '.join(about)})" if about else "")
    if by_steps:
        batches = sorted({(r["batch_size"], r["stage2_batch_size"]) for r in results})
        batch = "; ".join(f"batch {b}" + (f", stage 2 at {b2}" if b2 != b else "") for b, b2 in batches)
        cpus = sorted({r["cpu"] for r in results})
        loads = [r["load"] for r in results if r.get("load") is not None]
        load = (f" The machine's load average (1 minute) when each training ended: {min(loads):.1f} to {max(loads):.1f}; "
                "a loaded machine takes more minutes for the same steps." if loads else "")
        intro = (f"{world}, test split, mIoU (%) with background, threshold chosen on val; each run trained with "
                 f"{threads} CPU threads for the given number of steps ({batch}), on the preset's schedule over "
                 f"those steps (the full method: the last {STAGE2_SHARE:.0%} of them in stage 2). "
                 f"{when.replace(', so steps are given with each cell', '')}Mean ± spread (max - min) over seeds "
                 f"{sorted({r['seed'] for r in results})}; in brackets the group-majority mIoU (each group given "
                 "its majority true label: what the grouping itself allows); in parentheses the minutes the "
                 f"training took, mean over seeds (≥: a run resumed after an interruption, its first part not "
                 f"counted), on {', '.join(cpus)}.{load}")
    else:
        intro = (f"{world}, test split, mIoU (%) with background, threshold chosen on val; each run trained "
                 f"with {threads} CPU threads for the given wall-clock minutes. {when}Mean ± spread (max - min) "
                 f"over seeds {sorted({r['seed'] for r in results})}; in brackets the group-majority mIoU (each "
                 "group given its majority true label: what the grouping itself allows).")
    rows = []
    for variant in VARIANTS:
        if variant in kept["cells"]:
            name = kept.get("names", {}).get(variant, variant)
            rows.append([f"{name} (kept from {kept['measured'][variant]})",
                         *(kept["cells"][variant].get(b, "-") for b in budgets)])
            continue
        cells = []
        for b in budgets:
            rs = [r for r in results if r["variant"] == variant and budget_of(r) == b]
            if not rs:
                cells.append("-")
                continue
            m = np.array([r["miou"] for r in rs]) * 100
            g = np.array([r["group_majority_miou"] for r in rs]) * 100
            if by_steps:
                at_least = "≥" if any(r.get("resumed") for r in rs) else ""
                cost = f"{at_least}{np.mean([r['train_minutes'] for r in rs]):.1f} min"
            else:
                cost = f"{int(np.mean([sum(r['steps'].values()) for r in rs]))} steps"
            cells.append(f"{m.mean():.1f} ± {np.ptp(m):.1f} [{g.mean():.1f}] ({cost})")
        rows.append([f"{variant}: {labels[variant]}" if variant in labels else variant, *cells])
    pad = [None] * (len(budgets) - 1)
    rows += [["random init (chance)", f"{100 * chance['miou']:.1f} [{100 * chance['group_majority_miou']:.1f}]", *pad],
             [f"grid ceiling ({grid}x{grid} group maps)", f"{100 * ceiling:.1f}", *pad]]
    section = Blocks()
    section.text(intro)
    section.table(["variant", *((f"{b:g} {unit}", "right") for b in budgets)], rows)
    if kept["cells"]:
        section.text("A variant marked \"kept from DATE\" was not rerun: its row is the one the section written at DATE "
                     "gave, kept by `--keep-rows` for a change that does not touch its training.")
    return section.blocks


_KEPT = re.compile(r"^(?P<name>.+?)(?: \(kept from (?P<when>[^)]+)\))?$")


def _table(section: Section, first_column: str) -> dict | None:
    return next((t for t in section.tables() if t["columns"][0]["name"] == first_column), None)


def _measured(cell) -> bool:
    """Whether a results table's cell holds a measurement (not "-" or empty)."""
    return cell not in ("-", None, "")


def _row_of(table: dict, variant: str) -> tuple[list, re.Match] | None:
    """The results table's row of `variant` (named by the variant alone, or by the variant and its
    model, and perhaps marked kept) and its name's match, or None."""
    return next(((row, m) for row in table["rows"] if (m := _KEPT.match(row[0]))
                 and (m["name"] == variant or m["name"].startswith(f"{variant}: "))), None)


def kept_rows(section: Section, variants: list[str]) -> dict:
    """What an earlier results section written by `report` says of `variants`, to stand beside
    new runs of the other variants (`ovseg bench synthetic --keep-rows`): each variant's cells
    by budget, its row's name (the variant, and its model when the row names it), its
    diagnostics rows, the date of the section it was measured for (this section's, or the one a
    row already kept from an older section carries), and the budgets' unit ("min" or "steps").
    Raises ValueError when the section has no results table or no row of a variant."""
    table = _table(section, "variant")
    if table is None:
        raise ValueError("it holds no results table of `ovseg bench synthetic`")
    heads = [c["name"] for c in table["columns"][1:]]
    budgets = [float(h.split()[0]) for h in heads]
    unit = heads[0].split()[-1] if heads else "min"
    diagnostics = _table(section, "model")
    out = {"cells": {}, "measured": {}, "names": {}, "diagnostics": [], "unit": unit}
    for variant in variants:
        found = _row_of(table, variant)
        if found is None:
            raise ValueError(f"it has no row of {variant}")
        row, match = found
        when = match["when"] or section.measured
        out["cells"][variant] = {b: c for b, c in zip(budgets, row[1:]) if c not in ("-", None)}
        out["measured"][variant] = when
        out["names"][variant] = match["name"]
        for diag in (diagnostics or {"rows": []})["rows"]:
            name = _KEPT.match(diag[0])
            if name["name"].startswith(f"{variant}, seed "):
                out["diagnostics"].append(diag if name["when"] else [f"{name['name']} (kept from {when})", *diag[1:]])
    return out


def measured_variants(section: Section) -> list[str]:
    """The variants that have at least one measured cell in a stored section's results table
    (none when it has no such table): what a new call that reruns other variants would drop."""
    table = _table(section, "variant")
    if table is None:
        return []
    return [v for v in VARIANTS
            if (found := _row_of(table, v)) and any(_measured(c) for c in found[0][1:])]


def dropped_cells(section: Section, variants: list[str], budgets: list[float], seeds: list[int]) -> list[str]:
    """What a call that reruns `variants` at `budgets` with `seeds` would drop of their stored
    measurements, which it rewrites from its own runs alone: a budget's cell that the call does
    not run, a seed (named by a diagnostics row) that it does not train. E.g. "+ entity at 800
    steps", "+ entity seed 1"."""
    table = _table(section, "variant")
    if table is None:
        return []
    heads = [c["name"] for c in table["columns"][1:]]
    diagnostics = (_table(section, "model") or {"rows": []})["rows"]
    dropped = []
    for variant in variants:
        found = _row_of(table, variant)
        if found is None:
            continue
        for head, cell in zip(heads, found[0][1:]):
            if _measured(cell) and float(head.split()[0]) not in budgets:
                dropped.append(f"{variant} at {head}")
        stored = {int(m[1]) for row in diagnostics
                  if (m := re.match(rf"^{re.escape(variant)}, seed (\d+),", row[0]))}
        dropped += [f"{variant} seed {seed}" for seed in sorted(stored - set(seeds))]
    return dropped


def final_checkpoint(run_dir: Path, variant: str, budget: float, unit: str = "min") -> Path:
    """Where a variant's model is left after `budget` minutes (`train_and_evaluate`) or steps
    (`train_steps_and_evaluate`, unit "steps"). Wall-clock runs from before every variant kept
    its stage-1 snapshots have only `stage1/last.pt`, which is that budget's model only when the
    run trained no longer (`report` checks its step)."""
    if unit == "steps":
        return run_dir / f"{budget:g}steps" / ("stage2" if VARIANTS[variant]["stage2"] else "stage1") / "last.pt"
    if VARIANTS[variant]["stage2"]:
        return run_dir / f"stage2-{budget:g}min" / "last.pt"
    snapshot = run_dir / f"stage1-at-{budget:g}min.pt"
    return snapshot if snapshot.exists() else run_dir / "stage1" / "last.pt"


def eval_dir(run_dir: Path, budget: float, unit: str = "min") -> Path:
    """Where a run's evaluation at `budget` minutes or steps is written."""
    return run_dir / f"{budget:g}steps" / "eval" if unit == "steps" else run_dir / f"eval-{budget:g}min"


def _at_step(checkpoint: Path, steps: dict) -> bool:
    """False for a run's `stage1/last.pt` that is past the stage-1 step a result was measured at."""
    return checkpoint.parent.name != "stage1" or _step(checkpoint) == steps["stage1"]


PROBE_IMAGES = 800  # images of the world drawn for fitting the linear probe (the val split has 100)


def probe_world(world_dir: Path, out: Path) -> Path:
    """A second draw of the same world (same settings, another seed, one split of
    PROBE_IMAGES labelled images) to fit `group_probe` on, so that the probe never sees the
    test split and has more groups to learn from than the val split holds. Made once."""
    from ovseg.curation.synthetic import generate, load_config

    cfg = load_config(world_dir)
    generate(out, replace(cfg, n_train=0, n_val=PROBE_IMAGES, n_test=0, seed=cfg.seed + 1000))
    return out


def diagnose(checkpoints: dict[str, Path], world_dir: Path, split: str = "test",
             fit_dir: Path | None = None) -> dict[str, dict]:
    """`group_diagnostics` of each named checkpoint on the synthetic split, and `group_probe`
    fitted on the val split of `fit_dir` (a `probe_world`; default: this world's val split)
    and scored on `split`."""
    from ovseg.benchmarks.diagnostics import group_diagnostics, group_probe
    from ovseg.evaluation.datasets import load_synthetic
    from ovseg.training.checkpoint import load_model

    data = load_synthetic(world_dir / "voc", split=split)
    fit = load_synthetic((fit_dir or world_dir) / "voc", split="val")
    out = {}
    for name, path in checkpoints.items():
        model = load_model(path, map_location="cpu")
        out[name] = {**group_diagnostics(model, data), **group_probe(model, fit, data)}
    return out


def diagnostics_table(diagnostics: dict[str, dict], kept: list[list] = ()) -> dict:
    """A table block of `diagnose`'s output, in percent, with the `kept` rows of variants not
    rerun (from `kept_rows`), in the order of VARIANTS and the random model last."""

    def percent(value: float | None, nan: str) -> str:
        if value is None:
            return "-"
        return nan if value != value else f"{100 * value:.1f}"  # NaN: no group is mostly an object

    rows = [[name, f"{100 * d['image_top1_present']:.1f}", percent(d["group_accuracy"], "- (no group is mostly an object)"),
             percent(d.get("probe_group_accuracy"), "-"), d["groups_per_image"]] for name, d in diagnostics.items()]

    def order(row: list) -> int:
        return next((i for i, v in enumerate(VARIANTS) if row[0].startswith(f"{v}, seed ")), len(VARIANTS))

    section = Blocks()
    section.table(["model", ("image embedding names a present shape", "right"),
                   ("groups named with their object's shape", "right"), ("linear probe of the groups", "right"),
                   ("groups per image", "right", ".2f")], sorted([*rows, *(list(r) for r in kept)], key=order))
    return section.blocks[0]


def report(out: Path, world_dir: Path, results: list[dict], threads: int, section: Section,
           images: Path | None = None, preset: str = "synthetic-small", overrides: list[str] = (),
           kept: dict | None = None, style: str = "standard") -> Section:
    """Fill `section` with the benchmark's results: the mIoU table (rows named by their model:
    grouping, stem, losses) with its chance and ceiling rows, the diagnostics of every run at its
    largest budget and of the random model, and (with `images`, the folder next to the rendered
    page that pictures go to) the segmentation panels of the last variant's first seed at that
    budget. `kept` (from `kept_rows`) adds the rows of variants that were not rerun."""
    from ovseg.curation.synthetic import captions
    from ovseg.training.config import resolve
    from ovseg.training.model.image_encoder import assignment_grid

    chance = random_init(world_dir, out / "random", 0, preset, [c for _, c in captions(world_dir)], tuple(overrides))
    cfg = resolve(preset, overrides=overrides)
    grid = assignment_grid(cfg.model)
    ceiling = patch_grid_ceiling(world_dir, grid)
    unit = "steps" if any("budget_steps" in r for r in results) else "min"
    last = max(budget_of(r) for r in results)
    names = {r["variant"]: r["variant"].split()[-1].strip("()") for r in results}
    checkpoints = {f"{r['variant']}, seed {r['seed']}, {last:g} {unit}":
                   final_checkpoint(out / "runs" / f"{names[r['variant']]}-seed{r['seed']}", r["variant"], last, unit)
                   for r in results if budget_of(r) == last}
    if unit == "min":
        steps = {f"{r['variant']}, seed {r['seed']}, {last:g} min": r["steps"] for r in results if r["minutes"] == last}
        # a run trained past this budget by a later call, with no snapshot of it: no diagnostics
        checkpoints = {name: path for name, path in checkpoints.items() if _at_step(path, steps[name])}
    checkpoints["random init"] = out / "random" / "random.pt"
    labels = {v: model_label(v, cfg) for v in VARIANTS}
    section.text(f"Recipe: preset `{preset}`" + (f" with {', '.join(f'`{o}`' for o in overrides)}" if overrides else "") + ".")
    world_json = Path(world_dir) / "world.json"  # the world's size, for the table's introduction
    world_cfg = json.loads(world_json.read_text()).get("config", {}) if world_json.exists() else {}
    section.blocks += summarise(results, chance, ceiling, threads, grid, kept, labels, style, world_cfg.get("n_train"))
    section.text("Diagnostics on the test split (each image in one window at the training size; a group is "
                 "named by its best class prompt and scored against the majority true label of its pixels, "
                 "background groups left out; the linear probe is a logistic regression on the groups' features, "
                 f"fitted on the object groups of {PROBE_IMAGES} more images drawn from the same world: whether the "
                 "class is in the groups at all, whatever the prompts say):")
    section.blocks.append(diagnostics_table(diagnose(checkpoints, world_dir, fit_dir=probe_world(world_dir, out / "probe-world")),
                                            (kept or {}).get("diagnostics", ())))
    section.blocks += _pictures(out, results, last, images, unit=unit, prefix=section.section)
    section.text("What each preset's choices are and why: [recipes.md](recipes.md); what was measured while "
                 "looking for them: [notes/quality-log.md](notes/quality-log.md).")
    return section


def _pictures(out: Path, results: list[dict], budget: float, images: Path | None, n: int = 2, unit: str = "min",
              prefix: str = "synthetic") -> list[dict]:
    """Copy the first `n` test panels of the last variant (the full method when it ran), first
    seed, at `budget` minutes (or steps) into `images`, named after `prefix` (the section);
    the blocks that show them (none without `images`)."""
    import shutil

    if images is None:
        return []
    variant = [v for v in VARIANTS if any(r["variant"] == v for r in results)][-1]
    seed = min(r["seed"] for r in results if r["variant"] == variant)
    name = variant.split()[-1].strip("()")
    panels = sorted((eval_dir(out / "runs" / f"{name}-seed{seed}", budget, unit) / "pictures").glob("*_panel.png"))[:n]
    images.mkdir(parents=True, exist_ok=True)
    words = "minutes" if unit == "min" else "steps"
    section = Blocks()
    section.text(f"Test images after {budget:g} {words}, {variant}, seed {seed} (image, truth, prediction, groups):")
    for i, panel in enumerate(panels):
        target = images / f"{prefix}-{name}-{budget:g}{unit}-{i}.png"
        shutil.copyfile(panel, target)
        section.image(f"{variant} after {budget:g} {unit}, test image {i}", f"{images.name}/{target.name}")
    return section.blocks


VARIANT_NAMES = {"contrastive": "contrastive", "entity": "+ entity", "full": "+ mask (full)"}


def section_name(preset: str, style: str, label: str = "") -> str:
    """The results section of a world and recipe (`label`: the name of a preset changed by
    overrides); the default one keeps its old name."""
    if (preset, style, label) == ("synthetic-small", "standard", ""):
        return "synthetic"
    return f"synthetic-{style}-{preset}" + (f"-{label}" if label else "")


def benchmark_synthetic(out: Path, prepared: dict, variants: list[str], budgets: list[float], unit: str,
                        seeds: list[int], threads: int, parallel: int, device: str, preset: str,
                        overrides: list[str], style: str, kept: dict | None, images: Path | None,
                        command: str = "ovseg bench synthetic", label: str = "") -> Section:
    """Train and evaluate every variant (names of VARIANTS) and seed to each budget (`unit`
    "steps" or "min") on the `prepared` world and data (what `ovseg.cli.pipeline`'s
    `prepare_synthetic_data` returns), in `parallel` jobs; write OUT/results[-steps].json and
    return the results section (`section_name`)."""
    # step-budget jobs log apart from wall-clock ones: a folder may hold both
    suffix = "-steps" if unit == "steps" else ""
    short = {v: v.split()[-1].strip("()") for v in variants}
    jobs = [{"name": f"{short[v]}-seed{s}{suffix}", "variant": v, "budgets": budgets, "seed": s,
             "unit": unit, "data": str(prepared["data"]), "world": str(prepared["world"]), "device": device,
             "threads": threads, "run": str(out / "runs" / f"{short[v]}-seed{s}"),
             "preset": preset, "overrides": list(overrides)}
            for v in variants for s in seeds]
    results = run_parallel(jobs, threads, parallel, out / "logs")
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2))
    name = section_name(preset, style, label)
    world = "" if style == "standard" else f", {style} style"
    changed = f" with {', '.join(f'`{o}`' for o in overrides)}" if overrides else ""
    title = (f"Quality on the synthetic world{world}, preset `{preset}`{changed} (`ovseg bench synthetic`)" if name != "synthetic"
             else "Quality on the synthetic world (`ovseg bench synthetic`)")
    section = Section(name, title, command, machine={**machine(device), "torch_threads": threads})
    return report(out, prepared["world"], results, threads, section, images=images, kept=kept, preset=preset,
                  overrides=overrides, style=style)


def main() -> None:  # one job, in its own process (see run_parallel)
    job = json.loads(sys.argv[1])
    run = train_steps_and_evaluate if job.get("unit") == "steps" else train_and_evaluate
    result = run(job["variant"], Path(job["data"]), Path(job["world"]), Path(job["run"]), job["budgets"], job["seed"],
                 job.get("preset", "synthetic-small"), tuple(job.get("overrides", ())), job.get("device", "cpu"),
                 job.get("threads", 2), job.get("done", ()))
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
