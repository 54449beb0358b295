"""`ovseg bench download`: images per second from the loopback server, our download stage
(img2dataset + join + offsets + downloads.parquet) side by side with plain img2dataset on the
same URL list and options."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ovseg.benchmarks.measure import Measure
from ovseg.benchmarks.results import Section
from ovseg.curation import synthetic
from ovseg.curation.download import DownloadConfig, download, img2dataset_arguments, worker_env
from ovseg.curation.serve import serve


def _plain_img2dataset(url_list: Path, output: Path, cfg: DownloadConfig) -> float:
    """Seconds for img2dataset's own command line on the same input and options."""
    kwargs = img2dataset_arguments(url_list, output, cfg)
    script = Path(sys.executable).with_name("img2dataset")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from img2dataset.main import main; main()"]
    for key, value in kwargs.items():
        if value == float("inf"):  # img2dataset's default; fire would read "inf" as a string
            continue
        command.append(f"--{key}={value!r}" if isinstance(value, list) else f"--{key}={value}")
    with Measure() as m:
        subprocess.run(command, check=True, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return m.seconds


def _shard_rate(folder: Path) -> float:
    """Images per second inside img2dataset's workers (first shard start to last shard end),
    from its own *_stats.json: the rate without process start-up."""
    import json

    stats = [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["count"] for s in stats) / span


def benchmark_download(n_images: int = 3000, image_size: int = 64, processes: int = 2, threads: int = 32,
                       shard_size: int = 1000, repeats: int = 2, workdir: Optional[Path] = None,
                       command: str = "ovseg bench download") -> tuple[Section, dict]:
    """Measure both ways `repeats` times (alternating) and return (the results section, numbers);
    `command` is what the section says produced it."""
    import os

    load_before = os.getloadavg()[0]
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="ovseg-bench-download-")) if own_tmp else Path(workdir)
    try:
        world = synthetic.generate(root / "world", synthetic.WorldConfig(n_train=n_images, n_val=0, n_test=0,
                                                                         image_size=image_size))
        cfg = DownloadConfig(image_size=image_size, resize_mode="border", processes=processes, threads=threads,
                             shard_size=shard_size, timeout=30)
        ours, plain, join_seconds, successes = [], [], [], 0
        ours_inner, plain_inner = [], []
        with serve(world) as server:
            files = [f for f, _ in synthetic.captions(world)]
            table = pa.table({"sample_id": pa.array(range(len(files)), pa.int64()),
                              "url": [server.url_for(f) for f in files],
                              "caption": [c for _, c in synthetic.captions(world)]})
            data = root / "data"
            (data / "manifest").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, data / "manifest" / "part-00000.parquet")
            url_list = root / "urls.parquet"
            pq.write_table(table, url_list)
            for _ in range(repeats):
                shutil.rmtree(root / "plain", ignore_errors=True)
                plain.append(_plain_img2dataset(url_list, root / "plain", cfg))
                plain_inner.append(_shard_rate(root / "plain"))
                result = download(data, cfg, force=True, progress=False)
                ours.append(result.seconds)
                ours_inner.append(_shard_rate(data / "images"))
                successes = result.counts.get("success", 0)
                from ovseg.curation.download import join_downloads, read_manifest_urls

                with Measure() as m:
                    join_downloads(read_manifest_urls(data), data / "images", cfg)
                join_seconds.append(m.seconds)
        numbers = {
            "images": n_images, "successes": successes, "processes": processes, "threads": threads,
            "plain_seconds": plain, "ours_seconds": ours, "join_seconds": join_seconds,
            "plain_worker_images_per_s": statistics.median(plain_inner),
            "ours_worker_images_per_s": statistics.median(ours_inner),
            "plain_images_per_s": n_images / statistics.median(plain),
            "ours_images_per_s": n_images / statistics.median(ours),
        }
        numbers["ratio"] = numbers["ours_images_per_s"] / numbers["plain_images_per_s"]
        section = Section("download", "Download from the loopback server", command)
        section.text(
            f"{n_images} synthetic {image_size} px JPEGs served on 127.0.0.1, webdataset shards of {shard_size}, "
            f"{processes} processes x {threads} threads, resize mode border; median of {repeats} runs each, "
            "wall clock including process start-up (img2dataset's imports take seconds here). "
            f"Load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after on this shared machine: "
            "both ways run alternately under the same load, so their ratio is the comparison to read.")
        section.table(["", ("images/s, end to end", None, ".0f"), "seconds (runs)", ("images/s inside the workers", None, ".0f")], [
            ["plain `img2dataset`", numbers["plain_images_per_s"], ", ".join(f"{s:.1f}" for s in plain),
             numbers["plain_worker_images_per_s"]],
            ["`ovseg curate download` (img2dataset + join + offsets)", numbers["ours_images_per_s"],
             ", ".join(f"{s:.1f}" for s in ours), numbers["ours_worker_images_per_s"]]])
        section.text(
            f"Ours runs at {100 * numbers['ratio']:.0f}% of plain img2dataset's rate (target: at least 85%). "
            f"The join (tar headers + downloads.parquet) alone took {statistics.median(join_seconds):.2f} s; "
            f"{successes} of {n_images} images downloaded. \"Inside the workers\" is img2dataset's own count "
            "over the span of its shards' stats (no process start-up).")
        return section, numbers
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
