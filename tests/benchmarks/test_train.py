"""The training benchmark measures real work and reports it as Markdown."""

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
    md = report(loader, [("test", "cpu", run)])
    assert f"| test | cpu | {run['threads']} | 4 |" in md and "pairs/s" in md
    assert f"{loader['stage1_min']:.0f} to {loader['stage1_max']:.0f}" in md
