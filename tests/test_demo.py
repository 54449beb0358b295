"""`ovseg demo --quick` end to end through the CLI (generate, serve, curate, img2dataset,
train both stages, evaluate, report), and the quality benchmark's train-and-evaluate on the
data it leaves behind."""

import json

import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app


# Each test needs data made end to end (a curated, downloaded or demo folder): minutes, not seconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_quick_demo_runs_every_stage_and_writes_the_report(demo_out):
    out, output = demo_out
    for stage in ("generate the synthetic world", "curate", "download with img2dataset", "train stage 1 then stage 2",
                  "zero-shot evaluation"):
        assert stage in output
    summary = json.loads((out / "report" / "summary.json").read_text())
    # the shapes come out of spaCy and DuckDB as the selected entities
    assert set(summary["selected_entities"]) == set(summary["shapes"])
    # the bench's step budget: 80 steps, the last 30% in stage 2
    assert summary["training"]["steps"] == {"stage1": 56, "stage2": 24}
    assert 0.0 <= summary["evaluation"]["miou"] <= 1.0
    report = out / "report"
    assert (report / "training_curves.png").stat().st_size > 0
    assert "test mIoU" in (report / "summary.md").read_text()
    assert list((out / "run" / "80steps" / "eval" / "pictures").glob("*_panel.png"))


def test_the_demo_is_the_bench_cell_of_its_budget_and_seed(demo_out, tmp_path, monkeypatch):
    """The demo trains through `ovseg bench synthetic`'s step path on the bench's world: the bench,
    asked for the same cell in the demo's folder, finds the run trained and scores it as the demo did."""
    from ovseg.benchmarks import synthetic

    out, _ = demo_out
    summary = json.loads((out / "report" / "summary.json").read_text())
    monkeypatch.setattr("ovseg.training.engine.train", lambda *a, **k: pytest.fail("trained again"))
    (row,) = synthetic.train_steps_and_evaluate("+ mask (full)", out / "data", out / "world", out / "run", [80], seed=0,
                                                threads=2)
    assert row["miou"] == summary["evaluation"]["miou"] and row["steps"] == summary["training"]["steps"]


def test_a_prepared_world_is_used_without_serving_it_again(demo_out, monkeypatch):
    """A second bench or demo on the same folder must not serve the world on a new port (the
    first may hold the old one): that would make a new manifest of the same images."""
    from ovseg.cli.pipeline import DemoConfig, Stopwatch, prepare_synthetic_data
    from ovseg.curation import serve
    from ovseg.curation.synthetic import WorldConfig

    out, _ = demo_out
    monkeypatch.setattr(serve, "serve", lambda *a, **k: pytest.fail("served again"))
    quick = DemoConfig.quick(out)
    lines = []
    prepared = prepare_synthetic_data(out, WorldConfig(n_train=quick.n_train, n_val=quick.n_val, n_test=quick.n_test,
                                                       image_size=quick.image_size), 1, Stopwatch(lines.append))
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert prepared["selected"] == summary["selected_entities"] and prepared["downloads"] == summary["downloads"]
    assert any("curated and downloaded before" in line for line in lines)


def test_a_second_process_waits_for_the_one_preparing_the_world(demo_out):
    """Two benches started on one folder at once: the second must not draw the world again under
    the first's download (it did, and the first then downloaded half the images)."""
    import fcntl
    import threading

    from ovseg.cli.pipeline import DemoConfig, Stopwatch, prepare_synthetic_data
    from ovseg.curation.synthetic import WorldConfig

    out, _ = demo_out
    quick = DemoConfig.quick(out)
    world = WorldConfig(n_train=quick.n_train, n_val=quick.n_val, n_test=quick.n_test, image_size=quick.image_size)
    lines, got = [], []
    with open(out / ".prepare.lock", "w") as held:  # the first process, still preparing
        fcntl.flock(held, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: got.append(prepare_synthetic_data(out, world, 1, Stopwatch(lines.append))))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not got  # waiting, having touched nothing
        assert any("another process is preparing" in line for line in lines)
    second.join(timeout=60)
    assert not second.is_alive() and got[0]["data"] == out / "data"
    assert any("curated and downloaded before" in line for line in lines)


def test_quality_bench_evaluates_one_run_at_each_budget_and_the_full_method_in_two_stages(demo_out, tmp_path):
    from ovseg.benchmarks.results import render_blocks
    from ovseg.benchmarks.synthetic import summarise, train_and_evaluate

    out, _ = demo_out
    rows = train_and_evaluate("+ mask (full)", out / "data", out / "world", tmp_path / "run", [0.03, 0.06], seed=0,
                              threads=1)
    assert [r["minutes"] for r in rows] == [0.03, 0.06]
    first, second = rows
    assert 0 < first["steps"]["stage1"] <= second["steps"]["stage1"]  # the same stage-1 run, resumed
    assert first["steps"]["stage2"] > 0 and second["steps"]["stage2"] > 0
    assert (tmp_path / "run" / "stage1-at-0.03min.pt").exists() and (tmp_path / "run" / "stage2-0.06min").is_dir()
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["group_majority_miou"] <= 1.0
    table = render_blocks(summarise(rows, {"miou": 0.064, "group_majority_miou": 0.4}, 0.72, 1, 16))
    assert "| + mask (full) |" in table and "| random init (chance) | 6.4 [40.0] |" in table
    assert "| grid ceiling (16x16 group maps) | 72.0 |" in table


def test_quality_bench_goes_on_from_the_budgets_an_earlier_call_measured(demo_out, tmp_path):
    from ovseg.benchmarks.synthetic import train_and_evaluate

    out, _ = demo_out
    run = tmp_path / "run"
    first = train_and_evaluate("+ entity", out / "data", out / "world", run, [0.03], seed=0, threads=1)
    rows = train_and_evaluate("+ entity", out / "data", out / "world", run, [0.03, 0.06], seed=0, threads=1,
                              done=first)
    assert rows[0] == first[0] and rows[1]["minutes"] == 0.06
    assert rows[1]["steps"]["stage1"] > first[0]["steps"]["stage1"]  # trained on from there
    wrong = [{**first[0], "steps": {"stage1": -1}}]  # the checkpoint is past this budget
    with pytest.raises(RuntimeError, match="does not match its result file"):
        train_and_evaluate("+ entity", out / "data", out / "world", run, [0.03, 0.1], seed=0, threads=1, done=wrong)


def test_grid_ceiling_is_perfect_at_pixel_cells_and_falls_with_coarser_maps(demo_out):
    from ovseg.benchmarks.synthetic import patch_grid_ceiling

    world = demo_out[0] / "world"
    coarse, fine, pixels = (patch_grid_ceiling(world, cells) for cells in (8, 16, 64))  # 64 px labels
    assert pixels == pytest.approx(1.0)
    assert 0.0 < coarse < fine < 1.0


def test_the_probe_is_fitted_on_another_draw_of_the_world_and_scored_on_test(demo_out, tmp_path):
    import numpy as np
    from PIL import Image

    from ovseg.benchmarks.synthetic import PROBE_IMAGES, diagnose, probe_world

    out, _ = demo_out
    world = out / "world"
    probe = probe_world(world, tmp_path / "probe")
    mine, theirs = (json.loads((w / "world.json").read_text()) for w in (probe, world))
    assert mine["counts"] == {"train": 0, "val": PROBE_IMAGES, "test": 0}
    differ = {k for k in mine["config"] if mine["config"][k] != theirs["config"][k]}
    assert differ == {"n_train", "n_val", "n_test", "seed"}  # the same world, drawn again
    first = lambda w: sorted((w / "voc" / "JPEGImages").glob("val_*.jpg"))[0]  # noqa: E731
    assert not np.array_equal(np.asarray(Image.open(first(probe))), np.asarray(Image.open(first(world))))
    found = diagnose({"demo": out / "run" / "80steps" / "stage2" / "last.pt"}, world, fit_dir=probe)["demo"]
    assert 0.0 <= found["probe_group_accuracy"] <= 1.0 and found["probe_fit_groups"] > found["probe_test_groups"] > 0


def test_the_demo_refuses_a_folder_of_another_recipe_before_any_work(demo_out):
    """A finished run in OUT is read back, so OUT must hold runs of the recipe asked for."""
    out, _ = demo_out
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "model.assign_center=true"])
    assert result.exit_code == 2 and "pass another --out" in result.output
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "optim.lr=fast"])
    assert result.exit_code == 2 and "wants a number" in result.output
