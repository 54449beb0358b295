"""The training benchmark measures real work and reports it as Markdown."""

from ovseg.benchmarks.results import Section, render_section
from ovseg.benchmarks.train import loader_throughput, report, train_throughput


def test_training_benchmark_measures_the_loader_and_steps_and_reports_them():
    import torch

    torch.set_num_threads(2)
    loader = loader_throughput(n=12, image_size=32, source_size=64, repeats=3)
    assert torch.get_num_threads() == 2  # the loader's one thread must not leak into the timed steps
    assert loader["stage1"] > 0 and loader["stage2"] > 0 and loader["stage2_wall"] > 0
    for stage in ("stage1", "stage2"):  # the median of the passes lies within their range
        assert loader[f"{stage}_min"] <= loader[stage] <= loader[f"{stage}_max"]
    run = train_throughput("test", steps=1, warmup=1)
    assert run["steps_per_s"] > 0 and run["batch_size"] == 4
    md = render_section(report(Section("train", "Training throughput", "ovseg bench train"), loader, [("test", "cpu", run)]))
    assert f"| test | cpu | {run['threads']} | 4 |" in md and "pairs/s" in md
    assert f"{loader['stage1_min']:.0f} to {loader['stage1_max']:.0f}" in md


def test_bench_train_and_bench_model_time_the_same_train_step(monkeypatch):
    """`train_throughput` times its step with `ovseg bench model`'s `time_train_step` (with an
    optimizer), not a copy of it."""
    import ovseg.benchmarks.model as model_bench

    calls = []

    def fake(model, batch, device, repeats, warmup=1, optimizer=None):
        calls.append((repeats, warmup, optimizer is not None, sorted(batch)))
        return {"seconds": 0.5, "peak_mib": 2048.0, "start_mib": 1024.0}

    monkeypatch.setattr(model_bench, "time_train_step", fake)
    run = train_throughput("test", steps=3, warmup=2)
    assert calls == [(3, 2, True, sorted(calls[0][3]))] and "partner_image" in calls[0][3]
    assert run["steps_per_s"] == 2.0 and run["images_per_s"] == 8.0 and run["peak_gib"] == 2.0
    got = model_bench.measure_train_step("test", batch_size=2, repeats=1, device="cpu", threads=1)
    assert calls[-1][2] is False and got["seconds"] == 0.5 and got["step_mib"] == 1024.0


def test_accumulation_rows_time_one_batch_and_k_micro_batches_plain_and_cached():
    from ovseg.benchmarks.results import Section, render_block
    from ovseg.benchmarks.train import _accumulation_costs, report_accumulation

    runs = _accumulation_costs("test", "cpu", 8, (4,), repeats=1, threads=1)  # in this process: quicker
    assert [(r["mode"], r["k"], r["micro_batch"]) for r in runs] == [("full", 1, 8), ("plain", 4, 2), ("cached", 4, 2)]
    assert all(r["seconds"] > 0 and r["samples_per_s"] == 8 / r["seconds"] and r["step_mib"] >= 0 for r in runs)
    section = report_accumulation(Section("train", "t", "cmd"), runs, "cpu")
    table = "\n".join(render_block(b) for b in section.blocks)
    assert "| cached | 4 | 2 |" in table and "| one batch | 1 | 8 |" in table


def test_peak_growth_sees_memory_that_a_body_touches_and_frees():
    import mmap
    import time

    from ovseg.benchmarks.measure import PeakGrowth

    size = 64 * 2**20
    with PeakGrowth("cpu", interval=0.001) as grew:
        # Fresh anonymous pages, written: resident growth whatever malloc kept from earlier tests
        # (a numpy array may reuse a freed heap that is still resident, and then RSS does not move).
        block = mmap.mmap(-1, size)
        block.write(b"\1" * size)
        deadline = time.monotonic() + 5
        while grew._peak - grew._start < 40 and time.monotonic() < deadline:  # the sampler runs when scheduled
            time.sleep(0.01)
        block.close()
    assert grew.mib > 40


def test_an_accumulation_k_that_does_not_divide_the_batch_is_refused():
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    result = CliRunner().invoke(app, ["bench", "train", "--no-loader", "--presets", "test", "--accumulation", "3",
                                      "--accumulation-batch", "8"])
    assert result.exit_code == 2 and "must divide the batch 8" in result.output
