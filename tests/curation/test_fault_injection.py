"""Fault injection: `kill -9` of `ovseg curate cc12m` at a seeded random moment of each stage
(ingest, parse, select, manifest, download) on the synthetic world over loopback, then a rerun.

After each kill no process of the run is left, and the rerun gives the tables of an
uninterrupted run byte for byte (docs/recovery.md states these guarantees)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovseg.curation import synthetic as syn
from ovseg.curation.serve import serve

from .procs import descendants, kill_all, wait_gone

# The tables of the data contract that a rerun must reproduce exactly (img2dataset's own files
# carry timings, so its shards are compared through downloads.parquet and the image bytes).
TABLES = ("captions", "rejects.parquet", "parsed", "entities.parquet", "manifest", "entity_index.parquet",
          "pairs.parquet", "downloads.parquet")
STAGES = ("ingest", "parse", "select", "manifest", "download")
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


def _command(data: Path, url: str) -> list[str]:
    # one download thread: the members of each tar come in one order, so offsets are reproducible
    return [sys.executable, "-m", "ovseg.cli.main", "curate", "cc12m", str(data), "--source", f"{url}/captions.tsv",
            "--top-k-entities", "8", "--workers", "2", "--shard-size", "60", "--threads", "1",
            "--image-size", "16", "--processes", "1", "--download-threads", "1", "--images-per-tar", "30"]


def _files(data: Path) -> dict[str, bytes]:
    out = {}
    for name in TABLES:
        path = data / name
        for f in sorted(path.glob("*.parquet")) if path.is_dir() else [path]:
            out[str(f.relative_to(data))] = f.read_bytes()
    return out


def _stage_ends(data: Path) -> dict[str, float]:
    """When each stage finished (its marker's or output's modification time)."""
    ends = {s: (data / "_markers" / f"{s}.json").stat().st_mtime for s in STAGES[:-1]}
    ends["download"] = (data / "downloads.parquet").stat().st_mtime
    return ends


@pytest.fixture(scope="module")
def world_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    world = syn.generate(root / "world", syn.WorldConfig(n_train=150, n_val=0, n_test=0, seed=7))
    with serve(world) as server:
        syn.write_captions_tsv(world, server.url)
        data = root / "reference"
        began = time.time()
        subprocess.run(_command(data, server.url), env=ENV, check=True, capture_output=True)
        ends = _stage_ends(data)
        starts = dict(zip(STAGES, [began, *[ends[s] for s in STAGES[:-1]]]))
        windows = {s: (starts[s] - began, ends[s] - began) for s in STAGES}  # seconds after launch
        yield world, server, root, _files(data), windows


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", STAGES)
def test_kill_9_during_a_stage_then_rerun_gives_the_same_tables_and_leaves_no_process(world_and_reference,
                                                                                      stage_name):
    world, server, root, expected, windows = world_and_reference
    rng = random.Random(f"ovseg-faults-{stage_name}")  # seeded: the same moments every run
    data = root / f"killed-{stage_name}"
    start, end = windows[stage_name]
    delay = rng.uniform(0, 0.9 * (end - start))  # into the stage, as long as it took in the reference run
    before = STAGES[STAGES.index(stage_name) - 1] if stage_name != "ingest" else None
    run = subprocess.Popen(_command(data, server.url), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        began = time.monotonic()  # the stage starts when the one before it has its marker
        while before is not None and not (data / "_markers" / f"{before}.json").exists() and run.poll() is None:
            children |= descendants(run.pid)
            time.sleep(0.02)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and run.poll() is None:
            children |= descendants(run.pid)
            time.sleep(0.05)
        children |= descendants(run.pid)
        assert run.poll() is None, "the run ended before the kill"
        at = time.monotonic() - began
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert wait_gone(children, 20) == set(), f"processes left after kill -9 at {at:.1f} s"
    finally:
        kill_all(children)
    rerun = subprocess.run(_command(data, server.url), env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    got = _files(data)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert different == [], f"killed at {at:.1f} s ({stage_name}); rerun differs in {different}"
