"""The synthetic quality benchmark (`ovseg bench synthetic`): how much each of the paper's proxy
tasks adds, at equal training time on the same data.

Variants: contrastive only (the GroupViT-style baseline), + masked entity completion, and the
full OVSegmentor (+ cross-image mask consistency in a second stage). Each is trained for a
wall-clock budget with a fixed number of CPU threads, then evaluated on the synthetic test split
with the background threshold chosen on val. Two reference rows give the scale: a random-init
model (chance) and the ceiling the patch grid allows (every patch given its majority true label).
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

VARIANTS = {
    "contrastive": {"stage1": ["contrastive"], "stage2": None},
    "+ entity": {"stage1": ["contrastive", "entity", "grounding"], "stage2": None},
    "+ mask (full)": {"stage1": ["contrastive", "entity", "grounding"],
                      "stage2": ["contrastive", "entity", "grounding", "mask"]},
}
STAGE2_SHARE = 0.3  # of the budget, for the full method


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

    from ovseg.training.config import resolve
    from ovseg.training.engine import train

    torch.set_num_threads(threads)
    spec = VARIANTS[variant]
    cfg = resolve(preset, overrides=[f"data.data_dir={data_dir}", f"train.seed={seed}", "train.steps=1000000",
                                     "train.stage2_steps=1000000", f"train.device={device}", *overrides])
    share = STAGE2_SHARE if spec["stage2"] else 0.0
    t = cfg.train
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
        first = replace(cfg, train=replace(t, stage=1, stage1_losses=spec["stage1"], max_minutes=minutes))
        s1 = train(first, stage1_dir, progress=False)  # resumes from where the last budget stopped
        trained += minutes
        steps = {"stage1": s1["step"]}
        # kept for every variant: stage 2's start, and the model of this budget once the run goes on
        snapshot = checkpoint = run_dir / f"stage1-at-{budget:g}min.pt"
        shutil.copyfile(stage1_dir / "last.pt", snapshot)
        if spec["stage2"]:
            second = replace(cfg, train=replace(t, stage=2, stage2_losses=spec["stage2"], max_minutes=budget * share))
            s2 = train(second, run_dir / f"stage2-{budget:g}min", init=snapshot, progress=False)
            steps["stage2"] = s2["step"]
            checkpoint = run_dir / f"stage2-{budget:g}min" / "last.pt"
        scores = _evaluate(world_dir, checkpoint, run_dir / f"eval-{budget:g}min", device)
        results.append({"variant": variant, "seed": seed, "minutes": budget, "steps": steps, **scores,
                        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    return results


def _step(checkpoint: Path) -> int:
    from ovseg.training.checkpoint import load

    return load(checkpoint)["step"]


def _check_resumes_at(checkpoint: Path, step: int) -> None:
    found = _step(checkpoint)
    if found != step:
        raise RuntimeError(f"{checkpoint} is at step {found}, but the earlier budget ended at step {step}: "
                           "the run folder does not match its result file; delete both to rerun")


def check_recipe(out: Path, recipe: dict) -> None:
    """Record the preset and overrides the runs under `out` train with (OUT/recipe.json), or
    refuse another recipe: finished runs are reused, and must be of the recipe asked for. A
    folder from before the record was kept is taken to hold the default recipe."""
    from ovseg.training.config import ConfigError

    path = out / "recipe.json"
    if path.exists():
        held = json.loads(path.read_text())
    elif (out / "logs").is_dir():
        held = {"preset": "synthetic-small", "overrides": []}
    else:
        held = recipe
    if held != recipe:
        raise ConfigError(f"{out} holds runs of preset {held['preset']} with overrides {held['overrides']}, not "
                          f"{recipe['preset']} with {recipe['overrides']}: pass another --out")
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


def run_parallel(jobs: list[dict], threads: int, parallel: int, log_dir: Path, first_core: int = 0) -> list[dict]:
    """Run `train_and_evaluate` jobs as child processes, `parallel` at a time, each limited to
    `threads` CPU threads (and pinned to its own cores where the OS allows). Jobs whose result
    file is already in `log_dir` are read, not rerun, so an interrupted benchmark resumes; a job
    asked for a budget its result file lacks goes on from its last measured budget."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(jobs), [], []
    cores = os.cpu_count() or 1
    slot_free = list(range(parallel))
    for job in list(pending):  # a job that finished in an earlier (interrupted) call is not rerun
        done = log_dir / f"{job['name']}.json"
        if done.exists():
            earlier = json.loads(done.read_text())
            if {float(b) for b in job["budgets"]} <= {r["minutes"] for r in earlier}:
                results.extend(r for r in earlier if r["minutes"] in job["budgets"])
                pending.remove(job)
            else:  # longer budgets asked for: the run goes on from where the earlier call left it
                job["done"] = earlier
    while pending or running:
        while pending and slot_free:
            job, slot = pending.pop(0), slot_free.pop(0)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            result_file = log_dir / f"{job['name']}.json"
            args = [sys.executable, "-m", "ovseg.cli.quality", json.dumps({**job, "result": str(result_file)})]
            if hasattr(os, "sched_setaffinity") and cores >= first_core + parallel * threads:
                first = first_core + slot * threads
                args = ["taskset", "-c", ",".join(str(first + i) for i in range(threads)), *args]
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


def summarise(results: list[dict], chance: dict, ceiling: float, machine: str, threads: int, grid: int,
              kept: dict | None = None) -> str:
    """The mIoU table; `kept` (from `kept_rows`) adds the rows of variants that were not rerun,
    each named with the date of the section they come from."""
    import numpy as np

    kept = kept or {"cells": {}, "measured": {}}
    budgets = sorted({r["minutes"] for r in results} | {b for cells in kept["cells"].values() for b in cells})
    times = sorted(r["measured"] for r in results if "measured" in r)
    when = ""
    if times:
        untimed = sum("measured" not in r for r in results)
        when = (f"Results evaluated from {times[0]} to {times[-1]}"
                + (f" ({untimed} reused from before results were timed)" if untimed else "") + "; the runs "
                "of one call share the machine's speed, so steps are given with each cell. ")
    lines = [
        f"Synthetic world, test split, mIoU (%) with background, threshold chosen on val; each run trained "
        f"with {threads} CPU threads for the given wall-clock minutes. {machine} {when}Mean ± spread (max - min) "
        f"over seeds {sorted({r['seed'] for r in results})}; in brackets the group-majority mIoU (each "
        "group given its majority true label: what the grouping itself allows).", "",
        "| variant | " + " | ".join(f"{b:g} min" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for variant in VARIANTS:
        if variant in kept["cells"]:
            cells = [kept["cells"][variant].get(b, "-") for b in budgets]
            lines.append(f"| {variant} (kept from {kept['measured'][variant]}) | " + " | ".join(cells) + " |")
            continue
        cells = []
        for b in budgets:
            rs = [r for r in results if r["variant"] == variant and r["minutes"] == b]
            if not rs:
                cells.append("-")
                continue
            m = np.array([r["miou"] for r in rs]) * 100
            g = np.array([r["group_majority_miou"] for r in rs]) * 100
            steps = int(np.mean([sum(r["steps"].values()) for r in rs]))
            cells.append(f"{m.mean():.1f} ± {np.ptp(m):.1f} [{g.mean():.1f}] ({steps} steps)")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        f"| random init (chance) | {100 * chance['miou']:.1f} [{100 * chance['group_majority_miou']:.1f}] |",
        f"| grid ceiling ({grid}x{grid} group maps) | {100 * ceiling:.1f} |", "",
    ]
    if kept["cells"]:
        lines += ["A variant marked \"kept from DATE\" was not rerun: its row is the one the section written at DATE "
                  "gave, kept by `--keep-rows` for a change that does not touch its training.", ""]
    return "\n".join(lines)


_KEPT = re.compile(r"^\| (?P<name>[^|]+?)(?: \(kept from (?P<when>[^)]+)\))? \|")


def _cells(row: str) -> list[str]:
    """The cells of a Markdown table row after its first (the row's name)."""
    return [cell.strip() for cell in row.strip().strip("|").split("|")[1:]]


def kept_rows(section: str, variants: list[str]) -> dict:
    """What an earlier section written by `report` says of `variants`, to stand beside new runs
    of the other variants (`ovseg bench synthetic --keep-rows`): each variant's cells by budget,
    its diagnostics rows, and the date of the section it was measured for (this section's, or
    the one a row already kept from an older section carries). Raises ValueError when the section has no
    results table or no row of a variant."""
    lines = section.splitlines()
    header = next((line for line in lines if line.startswith("| variant |")), None)
    measured = re.search(r"Measured (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", section)
    if header is None or measured is None:
        raise ValueError("it holds no results table of `ovseg bench synthetic`")
    budgets = [float(cell.removesuffix(" min")) for cell in _cells(header)]
    out = {"cells": {}, "measured": {}, "diagnostics": []}
    for variant in variants:
        rows = [(line, m) for line in lines if (m := _KEPT.match(line)) and m["name"] == variant]
        if not rows:
            raise ValueError(f"it has no row of {variant}")
        line, match = rows[0]
        when = match["when"] or measured.group(1)
        out["cells"][variant] = {b: c for b, c in zip(budgets, _cells(line)) if c != "-"}
        out["measured"][variant] = when
        for row in lines:
            name = _KEPT.match(row)
            if name and name["name"].startswith(f"{variant}, seed "):
                out["diagnostics"].append(row if name["when"] else row.replace(
                    f"| {name['name']} |", f"| {name['name']} (kept from {when}) |", 1))
    return out


def final_checkpoint(run_dir: Path, variant: str, budget: float) -> Path:
    """Where `train_and_evaluate` leaves a variant's model after `budget` minutes. Runs from
    before every variant kept its stage-1 snapshots have only `stage1/last.pt`, which is that
    budget's model only when the run trained no longer (`report` checks its step)."""
    if VARIANTS[variant]["stage2"]:
        return run_dir / f"stage2-{budget:g}min" / "last.pt"
    snapshot = run_dir / f"stage1-at-{budget:g}min.pt"
    return snapshot if snapshot.exists() else run_dir / "stage1" / "last.pt"


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
    from ovseg.evaluation.datasets import load_synthetic
    from ovseg.evaluation.diagnostics import group_diagnostics, group_probe
    from ovseg.training.checkpoint import load_model

    data = load_synthetic(world_dir / "voc", split=split)
    fit = load_synthetic((fit_dir or world_dir) / "voc", split="val")
    out = {}
    for name, path in checkpoints.items():
        model = load_model(path, map_location="cpu")
        out[name] = {**group_diagnostics(model, data), **group_probe(model, fit, data)}
    return out


def diagnostics_table(diagnostics: dict[str, dict], kept: list[str] = ()) -> str:
    """Markdown rows of `diagnose`'s output, in percent, with the `kept` rows of variants not
    rerun (from `kept_rows`), in the order of VARIANTS and the random model last."""
    rows = []

    def percent(value: float | None, nan: str) -> str:
        if value is None:
            return "-"
        return nan if value != value else f"{100 * value:.1f}"  # NaN: no group is mostly an object

    for name, d in diagnostics.items():
        named = percent(d["group_accuracy"], "- (no group is mostly an object)")
        probe = percent(d.get("probe_group_accuracy"), "-")
        rows.append(f"| {name} | {100 * d['image_top1_present']:.1f} | {named} | {probe} | {d['groups_per_image']:.2f} |")

    def order(row: str) -> int:
        return next((i for i, v in enumerate(VARIANTS) if row.startswith(f"| {v}, seed ")), len(VARIANTS))

    header = ["| model | image embedding names a present shape | groups named with their object's shape | "
              "linear probe of the groups | groups per image |", "|---|---:|---:|---:|---:|"]
    return "\n".join(header + sorted([*rows, *kept], key=order)) + "\n"


def report(out: Path, world_dir: Path, results: list[dict], threads: int, machine: str,
           images: Path | None = None, preset: str = "synthetic-small", overrides: list[str] = (),
           kept: dict | None = None) -> str:
    """The benchmark's Markdown: the mIoU table with its chance and ceiling rows, the
    diagnostics of every run at its largest budget and of the random model, and (with `images`,
    the folder next to the Markdown file that pictures go to) the segmentation panels of the
    last variant's first seed at that budget. `kept` (from `kept_rows`) adds the rows of
    variants that were not rerun."""
    from ovseg.curation.synthetic import captions
    from ovseg.training.config import resolve
    from ovseg.training.model.image_encoder import assignment_grid

    chance = random_init(world_dir, out / "random", 0, preset, [c for _, c in captions(world_dir)], tuple(overrides))
    grid = assignment_grid(resolve(preset, overrides=overrides).model)
    ceiling = patch_grid_ceiling(world_dir, grid)
    last = max(r["minutes"] for r in results)
    names = {r["variant"]: r["variant"].split()[-1].strip("()") for r in results}
    checkpoints = {f"{r['variant']}, seed {r['seed']}, {last:g} min":
                   final_checkpoint(out / "runs" / f"{names[r['variant']]}-seed{r['seed']}", r["variant"], last)
                   for r in results if r["minutes"] == last}
    steps = {f"{r['variant']}, seed {r['seed']}, {last:g} min": r["steps"] for r in results if r["minutes"] == last}
    # a run trained past this budget by a later call, with no snapshot of it: no diagnostics
    checkpoints = {name: path for name, path in checkpoints.items() if _at_step(path, steps[name])}
    checkpoints["random init"] = out / "random" / "random.pt"
    recipe = f"Recipe: preset `{preset}`" + (f" with {', '.join(f'`{o}`' for o in overrides)}" if overrides else "")
    return (recipe + ".\n\n" + summarise(results, chance, ceiling, machine, threads, grid, kept)
            + "\nDiagnostics on the test split (each image in one window at the training size; a group is "
            "named by its best class prompt and scored against the majority true label of its pixels, "
            "background groups left out; the linear probe is a logistic regression on the groups' features, "
            f"fitted on the object groups of {PROBE_IMAGES} more images drawn from the same world: whether the "
            "class is in the groups at all, whatever the prompts say):\n\n"
            + diagnostics_table(diagnose(checkpoints, world_dir, fit_dir=probe_world(world_dir, out / "probe-world")),
                                (kept or {}).get("diagnostics", ()))
            + _pictures(out, results, last, images)
            + "\nWhat these numbers mean and what was measured while looking for the cause: "
            "[quality.md](quality.md).\n")


def _pictures(out: Path, results: list[dict], budget: float, images: Path | None, n: int = 2) -> str:
    """Copy the first `n` test panels of the last variant (the full method when it ran), first
    seed, at `budget` minutes into `images`; Markdown that shows them ('' without `images`)."""
    import shutil

    if images is None:
        return ""
    variant = [v for v in VARIANTS if any(r["variant"] == v for r in results)][-1]
    seed = min(r["seed"] for r in results if r["variant"] == variant)
    name = variant.split()[-1].strip("()")
    panels = sorted((out / "runs" / f"{name}-seed{seed}" / f"eval-{budget:g}min" / "pictures").glob("*_panel.png"))[:n]
    images.mkdir(parents=True, exist_ok=True)
    lines = [f"\nTest images after {budget:g} minutes, {variant}, seed {seed} (image, truth, prediction, groups):\n"]
    for i, panel in enumerate(panels):
        target = images / f"synthetic-{name}-{budget:g}min-{i}.png"
        shutil.copyfile(panel, target)
        lines.append(f"![{variant} after {budget:g} min, test image {i}]({images.name}/{target.name})")
    return "\n".join(lines) + "\n"


def main() -> None:  # one job, in its own process (see run_parallel)
    job = json.loads(sys.argv[1])
    result = train_and_evaluate(job["variant"], Path(job["data"]), Path(job["world"]), Path(job["run"]),
                                job["budgets"], job["seed"], job.get("preset", "synthetic-small"),
                                tuple(job.get("overrides", ())), job.get("device", "cpu"), job.get("threads", 2),
                                job.get("done", ()))
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
