"""The model benchmark's measurements run for real on the tiny preset (the full `ovseg bench
model` also times the paper preset, too slow for CI)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovseg.benchmarks.model import measure_encoder_vs_vit, measure_train_step  # noqa: E402


def test_train_step_measurement_reports_time_and_memory():
    got = measure_train_step("test", batch_size=2, repeats=1, device="cpu", threads=1)
    assert got["seconds"] > 0 and got["images_per_s"] == 2 / got["seconds"]
    assert got["peak_mib"] > 0 and got["step_mib"] >= 0


def test_encoder_comparison_times_both_encoders_of_the_same_width_and_depth():
    got = measure_encoder_vs_vit("test", batch_size=2, repeats=1, device="cpu", threads=1)
    assert got["grouping_vit_s"] > 0 and got["timm_vit_s"] > 0
    assert got["overhead"] == got["grouping_vit_s"] / got["timm_vit_s"] - 1
    # the grouping ViT has the timm ViT's blocks plus the grouping block and group tokens
    assert got["grouping_vit_params"] > got["timm_vit_params"]


def test_only_presets_with_a_plain_vit_of_the_same_shape_are_compared():
    from ovseg.benchmarks.model import _has_vit_twin

    assert _has_vit_twin("test") and _has_vit_twin("paper")
    assert not _has_vit_twin("synthetic-small")  # a CNN embedding and no transformer block
