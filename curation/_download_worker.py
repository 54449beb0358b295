"""Runs img2dataset in its own process: `python -m ovseg.curation._download_worker ARGS.json`.

img2dataset starts a pool of spawned processes (and a logger process) that re-import the main
module; running it as this small guarded module works the same from the CLI, from a notebook
and from pytest, and lets the caller stop the whole download by ending one process group.
ARGS.json holds img2dataset.download's keyword arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

# Keep every byte on the wire the download's own: no update check (albumentations), no W&B.
QUIET_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "WANDB_DISABLED": "true",
}


def stop_with_parent() -> None:
    """Get SIGINT when the process that started us dies (Linux), so that no orphaned img2dataset
    keeps writing shards that a rerun writes too; img2dataset's SIGINT handler stops its pool."""
    parent = os.environ.get("OVSEG_DOWNLOAD_PARENT")
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        sys.exit(1)


def main(args_path: str) -> None:
    stop_with_parent()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    with open(args_path) as f:
        kwargs = json.load(f)
    if kwargs.get("distributor") == "ray":
        import ray

        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (or `ray start` on this machine) picks the cluster
    elif kwargs.get("distributor") == "pyspark":
        from pyspark.sql import SparkSession

        # Spark's Python workers run `python3` from PATH unless told: that one may lack img2dataset
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

        # The master comes from spark-defaults.conf or PYSPARK_SUBMIT_ARGS; local[N] otherwise.
        builder = SparkSession.builder.appName("ovseg-download")
        if not os.environ.get("PYSPARK_SUBMIT_ARGS") and not os.environ.get("SPARK_HOME"):
            builder = builder.master(f"local[{kwargs.get('processes_count', 1)}]")
        builder.getOrCreate()
    # img2dataset imports W&B in every process of its pool, and W&B makes temporary folders at
    # import that it removes only at a normal interpreter exit, which pool processes skip: give
    # the whole download one scratch folder of its own and remove it afterwards.
    scratch = tempfile.mkdtemp(prefix="ovseg-img2dataset-")
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None  # read TMPDIR again
    try:
        from img2dataset import download

        download(**kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
