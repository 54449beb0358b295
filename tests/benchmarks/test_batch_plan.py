"""The official batches projected onto other GPUs from one measured row."""

import pytest

from ovseg.benchmarks.batch_plan import CACHED_STEP_COST, CC4M, GIB, project
from ovseg.training.batching import HEADROOM


def test_a_projected_micro_batch_fits_the_card_and_the_next_divisor_would_not():
    basis = {"batch": 256, "images_per_s": 500.0, "peak_gib": 50.0, "trainable": 200_000_000, "frozen": 100_000_000}
    fixed = (200_000_000 * 16 + 100_000_000 * 4) / GIB
    per_sample = (50.0 - fixed) / 256
    rows = {(r["global_batch"], r["gpus"], r["memory_gb"]): r for r in project(basis)}
    same = rows[(2048, 8, 80)]  # the measured shape: 256 per GPU on 80 GB fits whole
    assert (same["per_gpu"], same["micro_batch"], same["k"]) == (256, 256, 1)
    assert same["hours"] == pytest.approx(30 * CC4M / (500.0 * 8) / 3600)
    small = rows[(2048, 1, 24)]
    usable = 24e9 / GIB * HEADROOM
    assert fixed + small["micro_batch"] * per_sample <= usable < fixed + 2 * small["micro_batch"] * per_sample
    assert small["k"] * small["micro_batch"] == 2048
    assert small["hours"] == pytest.approx(30 * CC4M / (500.0 / CACHED_STEP_COST) / 3600)  # cached steps cost more
    assert len(rows) == 3 * 3 * 3  # three official batches, 8 / 4 / 1 GPUs, 24 / 40 / 80 GB
