"""The training engine through the real CLI: both stages, resume after kill -9, checkpoints in
a fresh process, overrides, unreadable images, torchrun with two gloo processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ovseg.cli.main import app

from .conftest import make_contract

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], round(r["loss/loss"], 5)) for r in lines if "loss/loss" in r]


def _cli(*args):
    return CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", *args])


def test_both_stages_train_and_checkpoints_hold_the_contract(tmp_path):
    data = make_contract(tmp_path / "D", n=16)
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "train.stages.1.steps=3", "train.stages.2.steps=2")
    assert result.exit_code == 0, result.output
    assert len(_losses(run / "stage1")) == 3 and len(_losses(run / "stage2")) == 2
    printed = [line for line in result.output.splitlines() if line.startswith("stage 2 step 2/2")]
    assert printed and all(word in printed[0] for word in ("samples/s", "lr", "mask=", "data wait"))
    state = torch.load(run / "stage2" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "sampler", "rng", "config", "tokenizer"} <= set(state)
    assert state["config"]["model"]["losses"] == ["contrastive", "entity", "grounding", "mask"]
    assert any(k.startswith("momentum_encoder.") for k in state["model"])
    stage2_parts = json.loads((run / "stage2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss/mask" in stage2_parts and "loss/entity" in stage2_parts
    # the text encoder is frozen in stage 2
    s1 = torch.load(run / "stage1" / "last.pt", weights_only=True)["model"]
    s2 = state["model"]
    text_keys = [k for k in s1 if k.startswith("text_encoder.")]
    assert text_keys and all(torch.equal(s1[k], s2[k]) for k in text_keys)
    assert (run / "stage1" / "config.yaml").exists()


@pytest.mark.slow
def test_stage2_with_the_partners_in_the_batch_trains_without_a_momentum_copy_and_resumes_exactly(tmp_path):
    """train.stages.2.partners=in_batch with model.momentum=0 and the text encoder left to train: the
    batch is batch_size / 2 samples and their partners, stage 2 keeps no momentum encoder, the
    text encoder moves, and a run resumed from a mid-epoch checkpoint repeats the losses of the
    run straight through (the sampler resumes by samples drawn, half a batch of rows)."""
    import shutil

    data = make_contract(tmp_path / "D", n=16)
    run = tmp_path / "run"
    args = ("--data", str(data), "train.stages.1.steps=2", "train.stages.2.steps=5", "train.batch_size=4",
            "train.ckpt_every=1", "train.keep_last=10", "train.log_every=1",
            "train.stages.2.partners=in_batch", "model.momentum=0", "train.stages.2.freeze_text=false")
    result = _cli("--run", str(run), *args)
    assert result.exit_code == 0, result.output
    stage2 = run / "stage2"
    records = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["loss/mask"] > 0 for r in records)
    state = torch.load(stage2 / "last.pt", weights_only=True)
    assert not any(k.startswith("momentum_encoder.") for k in state["model"])
    s1 = torch.load(run / "stage1" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(s1[k], state["model"][k]) for k in s1 if k.startswith("text_encoder."))

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    # keep steps 1-3, so stage 2 resumes mid-epoch (16 samples make 8 batches of 2 pairs)
    for late in sorted((resumed / "stage2" / "ckpt").glob("step-*.pt"))[3:]:
        late.unlink()
    (resumed / "stage2" / "last.pt").unlink()
    assert _cli("--run", str(resumed), *args).exit_code == 0  # stage 1 is done; stage 2 resumes at step 3
    assert _losses(resumed / "stage2") == _losses(stage2)


@pytest.mark.slow
def test_the_moving_average_of_the_weights_is_saved_used_for_evaluation_and_resumed_exactly(tmp_path):
    """train.ema_decay keeps timm's ModelEmaV3 of the weights: every checkpoint holds it, it
    differs from the trained weights, load_model (evaluation, segment) and stage 2's init take
    it, and a run stopped and resumed ends with the same average as one run straight through."""
    from ovseg.training.checkpoint import load_model, model_weights

    data = make_contract(tmp_path / "D", n=16)
    ema = ("train.ema_decay=0.9", "train.ckpt_every=2", "train.batch_size=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _cli("--data", str(data), "--run", str(straight), "--stage", "1", "train.stages.1.steps=4", *ema).exit_code == 0
    assert _cli("--data", str(data), "--run", str(resumed), "--stage", "1", "train.stages.1.steps=2", *ema).exit_code == 0
    assert _cli("--data", str(data), "--run", str(resumed), "--stage", "1", "train.stages.1.steps=4", *ema).exit_code == 0
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (straight, resumed))
    assert a["ema"] is not None and set(a["ema"]) == set(a["model"])
    moved = [k for k, v in a["model"].items() if v.is_floating_point() and not torch.equal(v, a["ema"][k])]
    assert moved, "the average should lag behind the trained weights"
    assert all(torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6) for k in a["ema"])
    evaluated = load_model(straight / "last.pt").state_dict()
    assert all(torch.equal(evaluated[k], model_weights(a)[k]) for k in moved)
    # stage 2 starts from the average
    second = tmp_path / "second"
    assert _cli("--data", str(data), "--run", str(second), "--stage", "2", "--init", str(straight / "last.pt"),
                "train.stages.2.steps=1").exit_code == 0
    text = [k for k in moved if k.startswith("text_encoder.")]  # frozen in stage 2: still the average
    s2 = torch.load(second / "last.pt", weights_only=True)["model"]
    assert text and all(torch.equal(s2[k], a["ema"][k]) for k in text)


def test_without_a_decay_no_average_is_kept(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    assert _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=1").exit_code == 0
    assert torch.load(run / "last.pt", weights_only=True)["ema"] is None
    result = _cli("--data", str(data), "--run", str(tmp_path / "bad"), "--stage", "1", "train.ema_decay=1.5")
    assert result.exit_code == 2 and "train.ema_decay" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_checkpoint_loads_into_a_fresh_process(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    assert _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=2").exit_code == 0
    code = (
        "import sys, torch; from ovseg.training.checkpoint import load_model; "
        f"m = load_model(r'{run / 'last.pt'}'); "
        "e = m.encode_image(torch.zeros(1, 3, 32, 32)); t = m.encode_text(['a photo of a circle.']); "
        "print(tuple(e.assignment.shape), tuple(t.shape))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 4, 4, 4) (1, 32)"


def test_overrides_reach_the_model(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=1", "model.num_groups=3")
    assert result.exit_code == 0, result.output
    from ovseg.training.checkpoint import load_model

    model = load_model(run / "last.pt")
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).assignment.shape[1] == 3


def test_a_stages_loss_weights_replace_the_models_for_that_stage_only(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=1",
                  "model.loss_weights.entity=0.5", "train.stages.1.loss_weights={contrastive: 0.25}")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "loss/loss" in x]
    parts = {k.split("/")[1]: v for k, v in record.items() if k.startswith("loss/") and k != "loss/loss"}
    assert {"contrastive", "entity"} <= set(parts)
    weights = {"contrastive": 0.25, "entity": 0.5}  # the stage's, then the model's, then 1
    expected = sum(weights.get(name, 1.0) * value for name, value in parts.items())
    assert record["loss/loss"] == pytest.approx(expected, rel=1e-5)
    assert record["loss/loss"] != pytest.approx(sum(parts.values()), rel=1e-3)
    # the saved config keeps the model's weights; the stage's stay the stage's
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["loss_weights"] == {"entity": 0.5}
    assert saved["train"]["stages"][0]["loss_weights"] == {"contrastive": 0.25}


def test_tensorboard_is_optional(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=1", "train.tensorboard=true")
    assert result.exit_code == 0, result.output
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert not (run / "tb").exists()  # warned, trained on, metrics.jsonl only
    else:
        assert any((run / "tb").iterdir())
    assert _losses(run)


def test_unknown_override_is_a_clear_error(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    result = _cli("--data", str(data), "--run", str(tmp_path / "r"), "train.stepz=1")
    assert result.exit_code == 2 and "unknown config key" in result.output


@pytest.mark.parametrize("args, message", [
    (["optim.lr=fast"], "config key 'optim.lr' wants a number, got 'fast'"),
    (["--preset", "nope"], "unknown preset 'nope'; available: paper, synthetic-paper, synthetic-small, test"),
])
def test_a_bad_value_or_preset_is_a_one_line_error(tmp_path, args, message):
    data = make_contract(tmp_path / "D", n=8)
    result = _cli("--data", str(data), "--run", str(tmp_path / "r"), *args)
    assert result.exit_code == 2 and result.output.strip() == f"ovseg train: {message}"


def test_missing_data_is_a_clear_error(tmp_path):
    result = _cli("--data", str(tmp_path / "nothing"), "--run", str(tmp_path / "r"))
    assert result.exit_code == 2 and "ovseg curate" in result.output


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_stop_the_run_past_the_limit(tmp_path):
    data = make_contract(tmp_path / "D", n=12, corrupt=(1, 5))
    run = tmp_path / "run"
    ok = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=4",
              "data.max_skip_rate=0.5", "data.min_samples_for_skip_check=4")
    assert ok.exit_code == 0, ok.output
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped"] >= 1
    bad = make_contract(tmp_path / "B", n=12, corrupt=tuple(range(0, 12, 2)))
    stopped = _cli("--data", str(bad), "--run", str(tmp_path / "run2"), "--stage", "1", "train.stages.1.steps=6",
                   "data.max_skip_rate=0.2", "data.min_samples_for_skip_check=4")
    assert stopped.exit_code == 1 and "could not be read" in stopped.output


def test_non_finite_loss_stops_naming_step_and_parts(tmp_path):
    data = make_contract(tmp_path / "D", n=8)
    result = _cli("--data", str(data), "--run", str(tmp_path / "r"), "--stage", "1", "train.stages.1.steps=2",
                  "model.logit_scale_init=.inf", "model.logit_scale_max=.inf")
    assert result.exit_code == 1
    assert "non-finite loss at step 0" in result.output and "contrastive=" in result.output


def _train_process(data, run, steps, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "ovseg.cli.main", "train", "--preset", "test", "--no-progress", "--stage", "1",
         "--data", str(data), "--run", str(run), f"train.stages.1.steps={steps}", "train.ckpt_every=2",
         "train.batch_size=2", "train.keep_last=10", *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_loss_sequence(tmp_path):
    data = make_contract(tmp_path / "D", n=24)
    straight = tmp_path / "straight"
    assert _train_process(data, straight, 12).wait(timeout=300) == 0
    expected = _losses(straight)

    resumed = tmp_path / "resumed"
    proc = _train_process(data, resumed, 12)
    deadline = time.time() + 240
    while time.time() < deadline and not list((resumed / "ckpt").glob("step-*.pt")):
        time.sleep(0.05)
    while time.time() < deadline and len(list((resumed / "ckpt").glob("step-*.pt"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_losses(resumed)) < 12, "the run finished before it could be killed"
    assert _train_process(data, resumed, 12).wait(timeout=300) == 0
    assert _losses(resumed) == expected


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    data = make_contract(tmp_path / "D", n=24)
    run = tmp_path / "run"
    proc = _train_process(data, run, 100000, extra=("train.ckpt_every=100000",))
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert '"stop": "signal"' in out
    assert (run / "last.pt").exists()


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_together_with_accumulation(tmp_path):
    data = make_contract(tmp_path / "D", n=16)
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "ovseg.cli.main", "train", "--preset", "test", "--no-progress", "--stage", "1",
         "--data", str(data), "--run", str(run), "train.stages.1.steps=2", "optim.accum_steps=2", "--nproc-per-node", "2",
         "--master-port", "29531"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # one writer: rank 0


@pytest.mark.slow
def test_periodic_validation_logs_val_miou(tmp_path):
    from ovseg.curation.synthetic import WorldConfig, generate

    world = generate(tmp_path / "world", WorldConfig(n_train=2, n_val=3, n_test=1, image_size=32))
    data = make_contract(tmp_path / "D", n=8)
    run = tmp_path / "run"
    result = _cli("--data", str(data), "--run", str(run), "--stage", "1", "train.stages.1.steps=2", "train.eval_every=1",
                  "--val", f"synthetic:{world / 'voc'}", "--val-images", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/miou" in r]
    assert [r["step"] for r in val] == [1, 2] and all(0 <= r["val/miou"] <= 1 for r in val)


# -- optimiser and schedule -------------------------------------------------------------------------

def test_the_official_schedule_is_timms_cosine_scheduler_stepped_as_the_official_loop_steps_it():
    """The public loop builds timm's CosineLRScheduler (warm-up from warmup_lr, cosine over all
    steps) and calls step_update(index of the step just taken) after each optimiser step."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from ovseg.training.engine import _schedule

    total, warmup, base, warmup_lr, min_lr = 40, 6, 3.2e-4, 8e-6, 8e-5
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = _schedule(ours, total, warmup, base, min_lr, warmup_lr, form="official")
    timm_schedule = CosineLRScheduler(theirs, t_initial=total, lr_min=min_lr, warmup_lr_init=warmup_lr,
                                      warmup_t=warmup, cycle_limit=1, t_in_epochs=False)
    for idx in range(total + 3):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9, abs=1e-15), idx
        ours.step(), theirs.step()
        schedule.step()
        timm_schedule.step_update(idx)
    assert ours.param_groups[0]["lr"] == pytest.approx(min_lr)


def test_the_ovseg_schedule_warms_up_from_a_fraction_of_the_peak_then_decays_over_the_remaining_steps():
    from ovseg.training.engine import _schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = _schedule(opt, 12, 4, 1.0, 0.1, form="ovseg")
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_weight_decay_groups_official_decays_all_but_1d_and_biases_ovseg_also_spares_tokens_and_scales():
    from ovseg.training.engine import _param_groups

    model = torch.nn.Module()
    model.fc = torch.nn.Linear(3, 2)
    model.norm = torch.nn.LayerNorm(2)
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 2))
    model.group_token = torch.nn.Parameter(torch.zeros(1, 3, 2))
    names = {id(p): n for n, p in model.named_parameters()}

    def grouped(rule):
        decay, no_decay = _param_groups(model, 0.05, rule)
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
        return sorted(names[id(p)] for p in decay["params"]), sorted(names[id(p)] for p in no_decay["params"])

    assert grouped("official") == (["fc.weight", "group_token", "logit_scale", "pos_embed"],
                                   ["fc.bias", "norm.bias", "norm.weight"])
    assert grouped("ovseg") == (["fc.weight"], ["fc.bias", "group_token", "logit_scale", "norm.bias",
                                                "norm.weight", "pos_embed"])
    with pytest.raises(ValueError, match="optim.no_decay"):
        _param_groups(model, 0.05, "none")


def test_the_paper_rates_are_the_official_ones_scaled_by_global_batch_over_4096_stage_2_its_own():
    from ovseg.training.config import resolve
    from ovseg.training.engine import stage_lengths, stage_rates

    cfg = resolve("paper")
    first, second = cfg.train.stages
    one = stage_rates(cfg, first, 8 * 256)  # run.sh: 8 GPUs x 256
    assert one == pytest.approx({"lr": 3.2e-4, "warmup_lr": 8e-6, "min_lr": 8e-5})
    two = stage_rates(cfg, second, 8 * 128)  # run_stage2.sh: 8 GPUs x 128
    assert two == pytest.approx({"lr": 2.5e-6, "warmup_lr": 1e-6, "min_lr": 2.5e-7})
    # the stage-2 rate does not move with stage 1's
    moved = resolve("paper", overrides=["optim.lr=1e-3"])
    assert stage_rates(moved, moved.train.stages[1], 1024) == two
    # lengths in epochs: 30 with 2 of warm-up, then 10 without
    assert stage_lengths(cfg, first, 100) == (3000, 200)
    assert stage_lengths(cfg, second, 100) == (1000, 0)
    steps = resolve("paper", overrides=["train.stages.1.epochs=null", "train.stages.1.steps=77"])
    assert stage_lengths(steps, steps.train.stages[0], 100) == (77, 200)
    # presets without stage-2 rates keep stage 1's times the factor, and its warm-up
    test = resolve("test")
    test_second = test.train.stages[1]
    assert stage_rates(test, test_second, 4)["lr"] == pytest.approx(test.optim.lr * test_second.lr_factor)
    assert stage_lengths(test, test_second, 10) == (test_second.steps, test.optim.warmup_steps)
