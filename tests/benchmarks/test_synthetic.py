"""The quality benchmark's bookkeeping: finished jobs are not rerun, and the tables."""

import json

import pytest

from ovseg.benchmarks import synthetic as bench
from ovseg.benchmarks.results import Section, render_block, render_blocks, save
from ovseg.benchmarks.synthetic import final_checkpoint, run_parallel, slot_cores


def summarise(*args, **kwargs) -> str:
    """The mIoU table's blocks, as the page shows them."""
    return render_blocks(bench.summarise(*args, **kwargs))


def diagnostics_table(*args) -> str:
    return render_block(bench.diagnostics_table(*args))


def test_a_job_whose_result_is_already_written_is_read_not_rerun(tmp_path):
    row = {"variant": "contrastive", "seed": 0, "minutes": 5.0, "steps": {"stage1": 10}, "miou": 0.1,
           "group_majority_miou": 0.3, "bg_threshold": 0.5}
    (tmp_path / "contrastive-seed0.json").write_text(json.dumps([row]))
    # a job that would fail if it ran: its data folders do not exist
    job = {"name": "contrastive-seed0", "variant": "contrastive", "budgets": [5.0], "seed": 0,
           "data": str(tmp_path / "missing"), "world": str(tmp_path / "missing"), "run": str(tmp_path / "run")}
    assert run_parallel([job], threads=1, parallel=1, log_dir=tmp_path) == [row]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_job_asked_for_a_longer_budget_runs_again_with_what_it_measured(tmp_path):
    row = {"variant": "contrastive", "seed": 0, "minutes": 5.0, "steps": {"stage1": 10}, "miou": 0.1,
           "group_majority_miou": 0.3, "bg_threshold": 0.5}
    (tmp_path / "contrastive-seed0.json").write_text(json.dumps([row]))
    job = {"name": "contrastive-seed0", "variant": "contrastive", "budgets": [5.0, 15.0], "seed": 0,
           "data": str(tmp_path / "missing"), "world": str(tmp_path / "missing"), "run": str(tmp_path / "run")}
    with pytest.raises(RuntimeError, match="job contrastive-seed0 failed"):  # it ran: its data do not exist
        run_parallel([job], threads=1, parallel=1, log_dir=tmp_path)
    assert job["done"] == [row]


def test_tables_show_mean_spread_steps_and_diagnostics_in_percent(tmp_path):
    rows = [{"variant": "contrastive", "seed": s, "minutes": 5.0, "steps": {"stage1": 100 + s}, "miou": m,
             "group_majority_miou": 0.3, "bg_threshold": 0.5} for s, m in ((0, 0.10), (1, 0.14))]
    table = summarise(rows, {"miou": 0.064, "group_majority_miou": 0.35}, 0.72, 1, 16)
    assert "| contrastive | 12.0 ± 4.0 [30.0] (100 steps) |" in table
    assert "| + entity | - |" in table
    diag = diagnostics_table({"m": {"image_top1_present": 0.5, "group_accuracy": 0.125, "groups_per_image": 2.5,
                                    "probe_group_accuracy": 0.375}})
    assert "| m | 50.0 | 12.5 | 37.5 | 2.50 |" in diag
    one_segment = diagnostics_table({"m": {"image_top1_present": 0.5, "group_accuracy": float("nan"), "groups_per_image": 1,
                                           "probe_group_accuracy": float("nan")}})
    assert "| m | 50.0 | - (no group is mostly an object) | - | 1.00 |" in one_segment
    assert final_checkpoint(tmp_path, "+ mask (full)", 15.0) == tmp_path / "stage2-15min" / "last.pt"
    assert final_checkpoint(tmp_path, "+ entity", 15.0) == tmp_path / "stage1" / "last.pt"  # a run from before snapshots
    (tmp_path / "stage1-at-15min.pt").write_bytes(b"")
    assert final_checkpoint(tmp_path, "+ entity", 15.0) == tmp_path / "stage1-at-15min.pt"


def test_the_table_says_when_its_results_were_evaluated(tmp_path):
    rows = [{"variant": "contrastive", "seed": s, "minutes": 5.0, "steps": {"stage1": 100}, "miou": 0.1,
             "group_majority_miou": 0.3, "bg_threshold": 0.5} for s in (0, 1, 2)]
    rows[0]["measured"], rows[1]["measured"] = "2026-12-03 19:38 UTC", "2026-12-03 15:02 UTC"
    table = summarise(rows, {"miou": 0.064, "group_majority_miou": 0.35}, 0.72, 1, 16)
    assert "evaluated from 2026-12-03 15:02 UTC to 2026-12-03 19:38 UTC (1 reused from before" in table
    assert "evaluated from" not in summarise(rows[2:], {"miou": 0.064, "group_majority_miou": 0.35}, 0.72, 1, 16)


def test_pictures_of_the_full_method_first_seed_are_copied_next_to_the_doc(tmp_path):
    from ovseg.benchmarks.synthetic import _pictures

    rows = [{"variant": v, "seed": s, "minutes": 15.0} for v in ("contrastive", "+ mask (full)") for s in (1, 0)]
    for name, seed in (("full", 0), ("full", 1), ("contrastive", 0)):
        pictures = tmp_path / "runs" / f"{name}-seed{seed}" / "eval-15min" / "pictures"
        pictures.mkdir(parents=True)
        for i in range(3):
            (pictures / f"test_{i:05d}_panel.png").write_bytes(f"{name}{seed}-{i}".encode())
    md = render_blocks(_pictures(tmp_path, rows, 15.0, tmp_path / "docs" / "images"))
    copied = sorted((tmp_path / "docs" / "images").iterdir())
    assert [p.name for p in copied] == ["synthetic-full-15min-0.png", "synthetic-full-15min-1.png"]
    assert [p.read_bytes() for p in copied] == [b"full0-0", b"full0-1"]
    assert "](images/synthetic-full-15min-0.png)" in md and "+ mask (full), seed 0" in md
    assert _pictures(tmp_path, rows, 15.0, None) == []


def test_a_folder_keeps_the_recipe_its_runs_were_trained_with(tmp_path):
    from ovseg.benchmarks.synthetic import check_recipe
    from ovseg.training.config import ConfigError

    default = {"preset": "synthetic-small", "overrides": []}
    other = {"preset": "synthetic-small", "overrides": ["model.loss_weights.contrastive=0.25"]}
    check_recipe(tmp_path / "a", other)
    check_recipe(tmp_path / "a", other)  # the same recipe again: its runs are reused
    with pytest.raises(ConfigError, match="pass another --out"):
        check_recipe(tmp_path / "a", default)
    (tmp_path / "old" / "logs").mkdir(parents=True)  # runs from before recipe.json was written
    check_recipe(tmp_path / "old", default)
    with pytest.raises(ConfigError, match="holds runs of preset synthetic-small with overrides \\[\\]"):
        check_recipe(tmp_path / "old", other)


@pytest.mark.parametrize("args, message", [
    (["--variants", "contrastive,fancy"], "unknown variants ['fancy']"),
    (["--minutes", "5,ten"], "comma-separated numbers"),
    (["optim.lr=fast"], "config key 'optim.lr' wants a number"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bad_benchmark_arguments_are_refused_before_any_work(tmp_path, args, message):
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    result = CliRunner().invoke(app, ["bench", "synthetic", "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "b" / "world").exists()


SECTION = (Section("synthetic", "Quality on the synthetic world", "ovseg bench synthetic",
                   measured="2026-12-03 20:35 UTC", machine={"arch": "x86_64", "logical_cpus": 2})
           .text("Recipe: preset `synthetic-small`.")
           .table(["variant", ("5 min", "right"), ("30 min", "right")], [
               ["contrastive", "10.6 ± 0.4 [87.2] (797 steps)", "10.5 ± 0.2 [87.4] (4664 steps)"],
               ["+ entity (kept from 2026-11-30 10:00 UTC)", "-", "58.8 ± 3.5 [88.1] (3072 steps)"],
               ["+ mask (full)", "13.7 ± 5.9 [86.7] (539 steps)", "59.2 ± 3.9 [86.7] (3314 steps)"],
               ["random init (chance)", "6.4 [86.7]", None]])
           .table(["model", "image embedding names a present shape", "groups named with their object's shape",
                   "linear probe of the groups", ("groups per image", "right", ".2f")], [
               ["contrastive, seed 0, 30 min", "32.0", "20.9", "31.0", 11.78],
               ["+ entity, seed 0, 30 min (kept from 2026-11-30 10:00 UTC)", "91.0", "77.5", "77.1", 11.77],
               ["+ mask (full), seed 0, 30 min", "87.7", "77.5", "75.7", 11.86],
               ["random init", "14.0", "5.5", "12.8", 11.61]]))


def test_rows_of_variants_not_rerun_are_kept_with_the_date_of_their_section():
    from ovseg.benchmarks.synthetic import kept_rows

    kept = kept_rows(SECTION, ["contrastive", "+ entity"])
    assert kept["cells"] == {"contrastive": {5.0: "10.6 ± 0.4 [87.2] (797 steps)", 30.0: "10.5 ± 0.2 [87.4] (4664 steps)"},
                             "+ entity": {30.0: "58.8 ± 3.5 [88.1] (3072 steps)"}}
    # a row kept once before keeps its own date, not the section's
    assert kept["measured"] == {"contrastive": "2026-12-03 20:35 UTC", "+ entity": "2026-11-30 10:00 UTC"}
    assert kept["diagnostics"] == [
        ["contrastive, seed 0, 30 min (kept from 2026-12-03 20:35 UTC)", "32.0", "20.9", "31.0", 11.78],
        ["+ entity, seed 0, 30 min (kept from 2026-11-30 10:00 UTC)", "91.0", "77.5", "77.1", 11.77]]
    assert kept_rows(SECTION, ["+ mask (full)"])["cells"]["+ mask (full)"][5.0].startswith("13.7")
    with pytest.raises(ValueError, match="no results table"):
        kept_rows(Section("synthetic", "t", "c").text("nothing here"), ["contrastive"])

    new = [{"variant": "+ mask (full)", "seed": 0, "minutes": m, "steps": {"stage1": 10, "stage2": 5}, "miou": 0.5,
            "group_majority_miou": 0.8, "bg_threshold": 0.5} for m in (5.0, 15.0)]
    table = summarise(new, {"miou": 0.064, "group_majority_miou": 0.35}, 0.72, 1, 16, kept)
    assert "| variant | 5 min | 15 min | 30 min |" in table
    assert "| contrastive (kept from 2026-12-03 20:35 UTC) | 10.6 ± 0.4 [87.2] (797 steps) | - | 10.5" in table
    assert "| + entity (kept from 2026-11-30 10:00 UTC) | - | - | 58.8" in table
    assert "| + mask (full) | 50.0 ± 0.0 [80.0] (15 steps) | 50.0 ± 0.0 [80.0] (15 steps) | - |" in table
    assert table.index("| contrastive (") < table.index("| + entity (") < table.index("| + mask (full) |")
    assert 'marked "kept from DATE" was not rerun' in table
    diag = diagnostics_table({"+ mask (full), seed 0, 15 min": {"image_top1_present": 0.5, "group_accuracy": 0.5,
                                                                "groups_per_image": 2, "probe_group_accuracy": 0.5},
                              "random init": {"image_top1_present": 0.1, "group_accuracy": 0.1, "groups_per_image": 2}},
                             kept["diagnostics"]).splitlines()
    assert [row.split(" |")[0] for row in diag[2:]] == [
        "| contrastive, seed 0, 30 min (kept from 2026-12-03 20:35 UTC)",
        "| + entity, seed 0, 30 min (kept from 2026-11-30 10:00 UTC)", "| + mask (full), seed 0, 15 min", "| random init"]


def test_keep_rows_is_refused_before_any_work_when_it_cannot_be_kept(tmp_path):
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    save(SECTION, tmp_path / "results")
    base = ["bench", "synthetic", "--out", str(tmp_path / "b"), "--doc", str(tmp_path / "benchmarks.md"),
            "--results", str(tmp_path / "results")]
    for args, message in ((["--variants", "full", "--keep-rows", "full"], "that --variants does not run"),
                          (["--variants", "full", "--keep-rows", "fancy"], "that --variants does not run"),
                          (["--variants", "full", "--keep-rows", "entity", "--results", str(tmp_path / "none")],
                           "holds no results table")):
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b" / "world").exists()


def test_a_call_that_would_drop_measured_rows_stops_and_says_how_to_keep_them(tmp_path):
    """Rerunning one variant into a section used to rewrite it with that variant alone, and the
    other variants' measured rows were gone without a word."""
    from typer.testing import CliRunner

    from ovseg.benchmarks.synthetic import measured_variants
    from ovseg.cli.main import app

    assert measured_variants(SECTION) == ["contrastive", "+ entity", "+ mask (full)"]
    partial = Section("synthetic", "t", "c").table(["variant", ("800 steps", "right")], [
        ["contrastive: learned grouping; contrastive", "-"], ["+ mask (full): learned grouping; all", "9.6 ± 3.4 [42.3]"],
        ["random init (chance)", "6.4 [10.5]"]])
    assert measured_variants(partial) == ["+ mask (full)"]
    assert measured_variants(Section("synthetic", "t", "c").text("no table")) == []

    save(SECTION, tmp_path / "results")
    base = ["bench", "synthetic", "--out", str(tmp_path / "b"), "--doc", str(tmp_path / "benchmarks.md"),
            "--results", str(tmp_path / "results")]
    result = CliRunner().invoke(app, [*base, "--variants", "full"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "holds measured rows of contrastive, + entity that this call does not run" in said
    assert "--keep-rows contrastive,entity keeps them" in said and "--drop-rows drops them" in said
    result = CliRunner().invoke(app, [*base, "--variants", "full", "--keep-rows", "entity"])
    assert result.exit_code == 2 and "holds measured rows of contrastive that" in " ".join(result.output.split())
    assert not (tmp_path / "b" / "world").exists()


def test_a_call_that_would_drop_a_budget_or_seed_of_a_rerun_variant_stops_and_says_which(tmp_path):
    """Rerunning a variant at one budget, or with one seed, rewrote its row from that call's runs
    alone: the other budget's cell and the other seed were gone from the table."""
    from typer.testing import CliRunner

    from ovseg.benchmarks.synthetic import dropped_cells
    from ovseg.cli.main import app

    stored = (Section("synthetic-standard-synthetic-paper-x", "t", "c")
              .table(["variant", ("800 steps", "right"), ("1600 steps", "right")], [
                  ["contrastive: learned grouping; contrastive", "7.0 ± 0.4 [43.6]", "-"],
                  ["+ mask (full): learned grouping; all", "9.6 ± 3.4 [42.3]", "11.6 ± 1.6 [41.1]"],
                  ["random init (chance)", "6.4 [10.5]", None]])
              .table(["model", "image embedding names a present shape", "groups named with their object's shape",
                      "linear probe of the groups", ("groups per image", "right", ".2f")], [
                  ["contrastive, seed 0, 800 steps", "34.0", "20.4", "17.9", 5.43],
                  ["contrastive, seed 1, 800 steps", "36.7", "23.6", "17.4", 6.66],
                  ["random init", "18.0", "8.5", "17.0", 7.06]]))
    assert dropped_cells(stored, ["contrastive"], [800, 1600], [0, 1]) == []
    assert dropped_cells(stored, ["contrastive"], [1600], [0]) == ["contrastive at 800 steps", "contrastive seed 1"]
    assert dropped_cells(stored, ["+ mask (full)"], [1600], [0, 1]) == ["+ mask (full) at 800 steps"]

    save(stored, tmp_path / "results")
    base = ["bench", "synthetic", "--out", str(tmp_path / "b"), "--doc", str(tmp_path / "benchmarks.md"),
            "--results", str(tmp_path / "results"), "--preset", "synthetic-paper", "--label", "x", "model.drop_path=0.0",
            "--keep-rows", "full"]
    result = CliRunner().invoke(app, [*base, "--variants", "contrastive", "--steps", "1600", "--seeds", "0"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "would drop (contrastive at 800 steps, contrastive seed 1)" in said and "--drop-rows" in said
    assert not (tmp_path / "b" / "world").exists()


# --- step budgets, model labels, the world's style ------------------------------------------------

def _step_row(variant, seed, budget, miou, minutes, resumed=False):
    return {"variant": variant, "seed": seed, "budget_steps": budget, "steps": {"stage1": budget}, "miou": miou,
            "group_majority_miou": 0.4, "bg_threshold": 0.5, "batch_size": 128, "stage2_batch_size": 64,
            "train_minutes": minutes, "resumed": resumed, "cpu": "Test CPU @ 2GHz", "threads": 2,
            "measured": "2026-12-07 10:00 UTC"}


def test_step_budget_tables_read_n_steps_and_give_each_cells_minutes_and_the_cpu():
    rows = [_step_row("contrastive", s, b, m, t) for s, b, m, t in
            ((0, 1000, 0.10, 3.0), (1, 1000, 0.14, 5.0), (0, 2000, 0.2, 8.0))]
    rows.append(_step_row("contrastive", 1, 2000, 0.3, 6.0, resumed=True))
    rows[0]["load"], rows[1]["load"] = 7.25, 1.5
    labels = {"contrastive": "learned grouping (Gumbel, hard), linear patches, 2 + 2 blocks; contrastive"}
    table = summarise(rows, {"miou": 0.064, "group_majority_miou": 0.35}, 0.72, 2, 8, labels=labels,
                      style="textured", n_train=48000)
    assert "| variant | 1000 steps | 2000 steps |" in table
    assert table.startswith("Synthetic world (textured style, 48,000 training images), test split")
    assert ("| contrastive: learned grouping (Gumbel, hard), linear patches, 2 + 2 blocks; contrastive | "
            "12.0 ± 4.0 [40.0] (4.0 min) | 25.0 ± 10.0 [40.0] (≥7.0 min) |") in table
    assert "(batch 128, stage 2 at 64)" in table and "load average (1 minute) when each training ended: 1.5 to 7.2" in table and "on Test CPU @ 2GHz" in table and "textured style" in table
    assert "| + entity | - | - |" in table  # no label given: the variant alone


def test_rows_name_the_model_each_preset_trains():
    from ovseg.benchmarks.synthetic import model_label, variant_stages
    from ovseg.training.config import resolve

    small, paper = resolve("synthetic-small"), resolve("synthetic-paper")
    assert variant_stages("+ entity", small) == (["contrastive", "entity", "grounding"], None)
    assert variant_stages("+ entity", paper) == (["contrastive", "entity"], None)
    assert variant_stages("+ mask (full)", paper) == (["contrastive", "entity"], ["contrastive", "entity", "mask"])
    assert variant_stages("contrastive", small) == (["contrastive"], None)
    assert model_label("+ mask (full)", paper) == ("learned grouping (Gumbel, hard), linear patches, 2 + 2 blocks; "
                                                   "contrastive + entity (official decoder), then + mask (official)")
    centred = resolve("synthetic-paper", overrides=["model.assign_center=true", "model.patch_embed=cnn"])
    assert model_label("contrastive", centred).startswith("learned grouping (Gumbel, hard, centred logits), CNN stem")
    quiet = resolve("synthetic-paper", overrides=["model.assign_center=true", "model.assign_noise=0.0"])
    assert model_label("contrastive", quiet).startswith("learned grouping (hard, no Gumbel noise, centred logits)")
    soft = resolve("synthetic-paper", overrides=["model.hard_assignment=false"])
    assert model_label("contrastive", soft).startswith("learned grouping (soft), linear patches")
    assert model_label("+ entity", small).startswith("clustering (no gradient to the assignment), CNN stem, 0 + 0")
    assert model_label("+ entity", small).endswith("contrastive + entity (ovseg decoder) + grounding")


def test_a_finished_step_budget_is_read_back_and_a_new_one_runs(tmp_path):
    row = _step_row("contrastive", 0, 1000, 0.1, 3.0)
    (tmp_path / "contrastive-seed0-steps.json").write_text(json.dumps([row]))
    job = {"name": "contrastive-seed0-steps", "variant": "contrastive", "budgets": [1000], "seed": 0, "unit": "steps",
           "data": str(tmp_path / "missing"), "world": str(tmp_path / "missing"), "run": str(tmp_path / "run")}
    assert run_parallel([dict(job)], threads=1, parallel=1, log_dir=tmp_path) == [row]
    longer = {**job, "budgets": [1000, 2000]}
    with pytest.raises(RuntimeError, match="job contrastive-seed0-steps failed"):
        run_parallel([longer], threads=1, parallel=1, log_dir=tmp_path)
    assert longer["done"] == [row]


def test_kept_rows_of_a_step_section_keep_their_model_names():
    from ovseg.benchmarks.synthetic import kept_rows

    section = Section("synthetic", "t", "c", measured="2026-12-07 10:00 UTC", machine={}).table(
        ["variant", "1000 steps", "2000 steps"], [["contrastive: learned grouping; contrastive", "10.0 ± 1.0 [40.0] (3.0 min)", "-"]])
    kept = kept_rows(section, ["contrastive"])
    assert kept["unit"] == "steps" and kept["cells"]["contrastive"] == {1000.0: "10.0 ± 1.0 [40.0] (3.0 min)"}
    assert kept["names"]["contrastive"] == "contrastive: learned grouping; contrastive"
    rows = [_step_row("+ entity", 0, 1000, 0.5, 4.0)]
    table = summarise(rows, {"miou": 0.06, "group_majority_miou": 0.3}, 0.7, 2, 8, kept)
    assert "| contrastive: learned grouping; contrastive (kept from 2026-12-07 10:00 UTC) | 10.0 ± 1.0" in table


def test_a_folder_keeps_the_world_style_its_runs_were_trained_on(tmp_path):
    from ovseg.benchmarks.synthetic import check_recipe
    from ovseg.training.config import ConfigError

    check_recipe(tmp_path / "a", {"preset": "synthetic-paper", "overrides": []})  # a record without a style: standard
    check_recipe(tmp_path / "a", {"preset": "synthetic-paper", "overrides": [], "style": "standard"})
    with pytest.raises(ConfigError, match="on the standard world, not synthetic-paper with \\[\\] on the textured"):
        check_recipe(tmp_path / "a", {"preset": "synthetic-paper", "overrides": [], "style": "textured"})


@pytest.mark.parametrize("args, message", [
    (["--steps", "100,many"], "comma-separated numbers"),
    (["--steps", "0"], "at least one step"),
    (["--steps", "100", "--minutes", "5"], "not both"),
    (["--style", "fancy"], "takes standard or textured"),
    (["model.assign_center=true"], "needs a name for its results section"),
    (["--label", "a b", "model.assign_center=true"], "letters, digits and dashes"),
])
def test_bad_step_budget_arguments_are_refused_before_any_work(tmp_path, args, message):
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    result = CliRunner().invoke(app, ["bench", "synthetic", "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # trains two tiny stages and evaluates: tens of seconds on a loaded 2-core machine
def test_a_step_budget_trains_to_its_steps_times_them_and_is_not_retrained(tmp_path):
    import os

    from ovseg.benchmarks.synthetic import train_steps_and_evaluate
    from ovseg.curation.synthetic import WorldConfig, generate
    from tests.training.conftest import make_contract

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    data = make_contract(tmp_path / "DATA")
    world = generate(tmp_path / "world", WorldConfig(n_train=0, n_val=2, n_test=2, image_size=32, style="textured"))
    run = tmp_path / "run"
    overrides = ("train.batch_size=4", "train.stages.2.batch_size=4", "train.log_every=1", "train.ckpt_every=100")
    [result] = train_steps_and_evaluate("+ mask (full)", data, world, run, [4], 0, "test", overrides, threads=1)
    assert result["budget_steps"] == 4 and result["steps"] == {"stage1": 3, "stage2": 1}
    assert result["train_minutes"] > 0 and not result["resumed"] and result["cpu"]
    assert result["batch_size"] == 4 and 0 <= result["group_majority_miou"] <= 1
    stage1 = run / "4steps" / "stage1" / "last.pt"
    assert torch_step(stage1) == 3 and torch_step(run / "4steps" / "stage2" / "last.pt") == 1
    stamp = stage1.stat().st_mtime_ns
    [again] = train_steps_and_evaluate("+ mask (full)", data, world, run, [4], 0, "test", overrides, threads=1)
    assert stage1.stat().st_mtime_ns == stamp  # finished stages are not trained again
    assert again["train_minutes"] == result["train_minutes"]


def torch_step(checkpoint):
    import torch

    return torch.load(checkpoint, weights_only=True)["step"]


def test_a_labelled_recipe_has_its_own_section_and_the_default_keeps_its_name():
    from ovseg.benchmarks.synthetic import section_name

    assert section_name("synthetic-small", "standard") == "synthetic"
    assert section_name("synthetic-paper", "standard") == "synthetic-standard-synthetic-paper"
    assert section_name("synthetic-paper", "standard", "center") == "synthetic-standard-synthetic-paper-center"
    assert section_name("synthetic-small", "standard", "x") == "synthetic-standard-synthetic-small-x"


def test_a_stage_stopped_by_a_signal_is_not_recorded_as_its_budget(tmp_path):
    """SIGTERM makes the engine save and return: the bench must not record that stage as done (its
    minutes) nor go on to evaluate it as the budget's model; the next call resumes it."""
    from ovseg.benchmarks.synthetic import StageInterrupted, _timed_train

    def stopped(cfg, run_dir, init=None, progress=True):
        (run_dir / "last.pt").write_bytes(b"saved")
        return {"step": 750, "stop": "signal", "minutes": 18.4}

    def finished(cfg, run_dir, init=None, progress=True):
        return {"step": 2000, "stop": "steps", "minutes": 30.0}

    with pytest.raises(StageInterrupted, match="stopped at step 750"):
        _timed_train(stopped, None, tmp_path)
    assert not (tmp_path / "minutes.json").exists()
    assert _timed_train(finished, None, tmp_path) == (30.0, True)  # resumed: its first part's minutes are lost
    assert _timed_train(stopped, None, tmp_path) == (30.0, True)   # done: read back, not trained


def test_runs_are_pinned_within_the_cores_the_benchmark_may_use(monkeypatch):
    """Two benchmarks started under `taskset -c 0` and `taskset -c 1` each pin their runs to
    their own core, not both to core 0."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {1}, raising=False)
    assert slot_cores(0, threads=1, parallel=1) == [1]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {2, 3, 6, 7}, raising=False)
    assert [slot_cores(slot, threads=2, parallel=2) for slot in (0, 1)] == [[2, 3], [6, 7]]
    assert slot_cores(0, threads=2, parallel=3) is None  # too few cores: the OS places the runs
