"""The whole pipeline on the synthetic world, as one library function (`ovseg demo` calls it).

generate the world -> serve it on loopback -> ingest its caption TSV over HTTP -> spaCy parse ->
DuckDB select (the shapes must come out on top) -> manifest, entity index, pairs ->
img2dataset download from the loopback server -> stage 1 and stage 2 training on the CPU ->
zero-shot evaluation on the test split (threshold chosen on val) -> a report folder.

This lives in ovseg.cli because it is the one place allowed to import every package.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    n_train: int = 6000
    n_val: int = 100
    n_test: int = 300
    image_size: int = 64              # the world's images (the preset reads them at its model.image_size)
    seed: int = 0
    preset: str = "synthetic-small"
    steps: int = 2000                 # the README table's budget: the demo is its "+ mask (full)" cell for this seed
    threads: int = 2                  # torch threads (the result differs only by float rounding)
    workers: int = 2
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, out: Path) -> "DemoConfig":
        """A smoke-sized run: a couple of minutes on two cores."""
        return cls(out=out, n_train=600, n_val=30, n_test=40, steps=80)


class Stopwatch:
    def __init__(self, report: Callable[[str], None]):
        self.report = report
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        self.report(f"== {name}")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - start
        self.report(f"   {name}: {self.times[name]:.1f} s")
        return result


def run_demo(cfg: DemoConfig, report: Callable[[str], None] = print) -> dict:
    """Run every stage into `cfg.out`; returns the summary written to `cfg.out/report/summary.json`."""
    from ovseg.benchmarks.synthetic import eval_dir, train_steps_and_evaluate
    from ovseg.curation.synthetic import WorldConfig

    out = Path(cfg.out)
    run_dir, report_dir = out / "run", out / "report"
    watch = Stopwatch(report)
    # the benchmark's world (drawn with its seed 0); cfg.seed is the training seed
    world_cfg = WorldConfig(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, image_size=cfg.image_size)
    prepared = prepare_synthetic_data(out, world_cfg, cfg.workers, watch)
    world_dir, data_dir = prepared["world"], prepared["data"]
    results, selected, downloads = prepared["curation"], prepared["selected"], prepared["downloads"]
    shapes = list(world_cfg.shapes)

    (row,) = watch.run("train stage 1 then stage 2 on the CPU, then the zero-shot evaluation on the test split",
                       train_steps_and_evaluate, "+ mask (full)", data_dir, world_dir, run_dir, [cfg.steps], cfg.seed,
                       preset=cfg.preset, overrides=tuple(cfg.overrides), threads=cfg.threads)
    evaluation = {k: row[k] for k in ("miou", "group_majority_miou", "bg_threshold")}
    summary = {
        "selected_entities": selected, "shapes": shapes, "curation": results, "downloads": downloads,
        "training": {"steps": row["steps"], "batch_size": row["batch_size"], "stage2_batch_size": row["stage2_batch_size"],
                     "train_minutes": row["train_minutes"], "threads": row["threads"]},
        "evaluation": evaluation, "run": str(run_dir / f"{cfg.steps}steps"), "eval": str(eval_dir(run_dir, cfg.steps, "steps")),
        "seconds": watch.times, "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()},
    }
    _write_report(report_dir, summary)
    report(f"== done in {sum(watch.times.values()) / 60:.1f} min: test mIoU {100 * evaluation['miou']:.1f} "
           f"(background threshold {evaluation['bg_threshold']:.2f} chosen on val); report in {report_dir}")
    return summary


def prepare_synthetic_data(out: Path, world_cfg, workers: int, watch: Stopwatch) -> dict:
    """Generate the world into OUT/world, serve it on loopback, curate its captions into
    OUT/data and download the manifest's images from the server (each step skipped when done).
    One process at a time per OUT: another (a second bench on the same folder) waits for it and
    then finds the world prepared, instead of drawing it again under a running download."""
    import fcntl

    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / ".prepare.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            watch.report(f"   another process is preparing {out}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_synthetic_data(out, world_cfg, workers, watch)


def _prepare_synthetic_data(out: Path, world_cfg, workers: int, watch: Stopwatch) -> dict:
    from ovseg.curation.download import DownloadConfig, download
    from ovseg.curation.pipeline import CurateConfig, curate, describe
    from ovseg.curation.select import SelectConfig
    from ovseg.curation.serve import serve
    from ovseg.curation.synthetic import generate, write_captions_tsv

    report = watch.report
    world_dir, data_dir = Path(out) / "world", Path(out) / "data"
    watch.run("generate the synthetic world", generate, world_dir, world_cfg)
    shapes = list(world_cfg.shapes)
    # A world curated and downloaded before is used as it is: serving it again could need a new
    # port (another bench or demo on this folder holding the old one), which would make a new
    # manifest of the same images.
    marker = Path(out) / "prepared.json"
    settings = json.loads(json.dumps(asdict(world_cfg), default=str))
    if marker.exists():
        held = json.loads(marker.read_text())
        if held.get("world") == settings and (data_dir / "downloads.parquet").exists():
            report(f"   {out} was curated and downloaded before: using it")
            return {"world": world_dir, "data": data_dir, "curation": held["curation"], "selected": held["selected"],
                    "downloads": held["downloads"]}
        marker.unlink()
    # The manifest keeps the URLs it was ingested with, so a rerun (after a kill during the
    # download, say) serves on the same port again: the download then resumes where it stopped.
    port_file = Path(out) / "serve_port"
    port = int(port_file.read_text()) if port_file.exists() else 0
    try:
        server_context = serve(world_dir, port=port)
        server = server_context.__enter__()
    except OSError:
        report(f"   port {port} is taken: serving on a new one (a partial download restarts)")
        server_context = serve(world_dir)
        server = server_context.__enter__()
    port_file.write_text(str(server.port))
    try:
        report(f"   serving {world_dir} at {server.url}")
        write_captions_tsv(world_dir, server.url)
        curate_cfg = CurateConfig(source=f"{server.url}/captions.tsv", workers=workers,
                                  select=SelectConfig(top_k=len(shapes)), seed=world_cfg.seed)
        results = watch.run("curate: ingest over HTTP, spaCy parse, DuckDB select, manifest, index, pairs",
                            curate, data_dir, curate_cfg, report=lambda line: report(f"   {line}"))
        selected = _selected_entities(data_dir)
        report(f"   selected entities: {', '.join(selected)}")
        if set(selected) != set(shapes):
            report(f"   warning: the selected entities differ from the shapes ({', '.join(sorted(set(shapes) ^ set(selected)))})")
        downloads = watch.run("download with img2dataset from the loopback server", download, data_dir,
                              DownloadConfig(image_size=world_cfg.image_size, resize_mode="no", processes=1,
                                             threads=16, shard_size=2000))
        report(f"   {downloads.counts}")
    finally:
        server_context.__exit__(None, None, None)
    prepared = {"curation": {k: describe(k, v) for k, v in results.items()}, "selected": selected,
                "downloads": downloads.counts}
    if downloads.complete:
        tmp = marker.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"world": settings, **prepared}, default=str))
        tmp.replace(marker)
    return {"world": world_dir, "data": data_dir, **prepared}


def _selected_entities(data_dir: Path) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(data_dir / "entities.parquet", columns=["entity", "selected", "rank"])
    table = table.filter(pc.equal(table["selected"], True)).sort_by("rank")
    return table["entity"].to_pylist()


def _write_report(report_dir: Path, summary: dict) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    run = Path(summary["run"])
    plot_curves([run / "stage1" / "metrics.jsonl", run / "stage2" / "metrics.jsonl"], report_dir / "training_curves.png")
    e, t = summary["evaluation"], summary["training"]
    lines = [
        "# ovseg demo report", "",
        f"- selected entities: {', '.join(summary['selected_entities'])}",
        f"- downloads: {summary['downloads']}",
        f"- stage 1: {t['steps']['stage1']} steps at batch {t['batch_size']}, stage 2: {t['steps'].get('stage2', 0)} "
        f"steps at batch {t['stage2_batch_size']} ({t['train_minutes']:.1f} min of training on {t['threads']} threads)",
        f"- **test mIoU {100 * e['miou']:.1f}** (background threshold {e['bg_threshold']:.2f} chosen on val)",
        f"- group-majority mIoU {100 * e['group_majority_miou']:.1f} (each group given its majority true label: what the grouping allows)",
        "", "| stage | seconds |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()],
        "", f"Per-class results and pictures (image, truth, prediction, groups): `{summary['eval']}`;",
        "training curves: `training_curves.png`.", "",
    ]
    (report_dir / "summary.md").write_text("\n".join(lines))


def plot_curves(metrics_files: list[Path], png: Path) -> None:
    """Loss parts against step, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [f for f in metrics_files if f.exists()]
    fig, axes = plt.subplots(1, max(1, len(files)), figsize=(6 * max(1, len(files)), 4), squeeze=False)
    for ax, path in zip(axes[0], files):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = [r for r in records if "loss/loss" in r]
        for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
            ax.plot([r["step"] for r in records], [r[key] for r in records], label=key.removeprefix("loss/"))
        ax.set_title(path.parent.name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
