"""Parse workers end with their parent, even when it is killed with SIGKILL (issue 26 item 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .procs import descendants, kill_all, wait_gone

REPO = Path(__file__).resolve().parents[2]

_PARENT = """
import multiprocessing, sys, time
from ovseg.curation.parse import die_with_parent

def child(parent):
    die_with_parent(parent)
    time.sleep(120)

if __name__ == "__main__":
    import os
    p = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(120)
"""


def test_a_process_that_called_die_with_parent_ends_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_gone({child}, 10) == set()
    finally:
        kill_all({child})


@pytest.mark.slow
def test_kill_9_of_a_parallel_parse_leaves_no_worker(tmp_path):
    src = tmp_path / "cc.tsv"
    src.write_text("".join(f"https://e.com/{i}.jpg\ta red dog and a blue cat number {i} on a mat\n"
                           for i in range(40_000)))
    data = tmp_path / "data"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    cli = [sys.executable, "-m", "ovseg.cli.main", "curate"]
    subprocess.run([*cli, "ingest", str(data), "--source", str(src), "--shard-size", "20000"], check=True,
                   env=env, capture_output=True)
    parse = subprocess.Popen([*cli, "parse", str(data), "--workers", "2"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:  # the two spaCy workers (and a tracker)
            time.sleep(0.2)
            workers = descendants(parse.pid)
        assert len(workers) >= 2, "the parse never started its workers"
        time.sleep(3.0)  # into the parse
        os.kill(parse.pid, signal.SIGKILL)
        parse.wait()
        assert wait_gone(workers, 10) == set()
    finally:
        kill_all(workers | {parse.pid})
