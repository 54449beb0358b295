"""`ovseg bench mask-targets`: the measurement of what the mask-consistency loss trains on, with
a real (tiny, untrained) model, pairs whose truth is known, and a real synthetic world."""

import copy
import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from ovseg.benchmarks.mask_targets import LabelledPair, Setting, mask_target_quality, settings_of
from ovseg.cli.main import app


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from ovseg.training.config import resolve, to_dict
    from ovseg.training.model import build_model
    from ovseg.training.tokenizer import tokenizer_to_json, train_wordpiece

    cfg = resolve("test", overrides=["model.mask_keep_groups=2"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, losses=["contrastive", "mask"]))  # a stage-2 model
    tokenizer = train_wordpiece(["a photo of a red circle and a blue star on a striped background"] * 3, vocab_size=200)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "tokenizer": tokenizer_to_json(tokenizer)}, path)
    return model, path


def _pair(partner_fill: int, own_fill: int = 1, seed: int = 0) -> LabelledPair:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    partner = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return LabelledPair(image, np.full((32, 32), own_fill), partner, np.full((32, 32), partner_fill), 1, "circle")


SETTINGS = [Setting(grid, keep, matching) for grid in ("assignment", "tokens") for keep in (1, 2)
            for matching in ("dice", "entity")]


def test_precision_is_full_when_every_pixel_is_the_object_and_nil_when_none_is(built):
    model, _ = built
    full = mask_target_quality(model, [_pair(1, seed=s) for s in range(3)], SETTINGS)
    none = mask_target_quality(model, [_pair(0, own_fill=0, seed=s) for s in range(3)], SETTINGS)
    # each pair is measured both ways: the image all object and its partner none of it, then
    # the other way round; every kept group gives one student mask in each direction
    half = mask_target_quality(model, [_pair(0, own_fill=1, seed=s) for s in range(3)], SETTINGS)
    for setting in SETTINGS:
        m = full[setting]
        assert m["pairs"] == 3
        assert m["kept_on_object"] == pytest.approx(1.0)
        assert m["student_precision"] == pytest.approx(1.0)
        if m["target_empty"] < 1:
            assert m["target_precision"] == pytest.approx(1.0)
            assert 0 < m["target_recall"] <= 1
        n = none[setting]
        assert n["kept_on_object"] == 0 and n["student_precision"] == 0
        assert "target_recall" not in n  # no object to cover
        if n["target_empty"] < 1:
            assert n["target_precision"] == 0
        assert half[setting]["student_precision"] == pytest.approx(0.5)


def test_the_models_own_setting_is_measured_with_the_papers_form_of_the_loss(built):
    model, _ = built  # the test preset: keep 2, dice, assignment grid
    assert settings_of(model) == [Setting("assignment", 4, "dice"), Setting("assignment", 2, "dice")]
    results = mask_target_quality(model, [_pair(1)])
    assert list(results) == settings_of(model)


@pytest.mark.parametrize("setting", SETTINGS)
def test_targets_that_cover_the_whole_partner_measure_the_share_of_it_that_is_the_object(built, setting):
    """At threshold 0 every target is the whole partner: its precision is the share of the
    partner that is the object (half of it one way, all of it the other) and its recall 1."""
    model, _ = built
    model = copy.deepcopy(model)
    model.cfg = dataclasses.replace(model.cfg, mask_target_threshold=0.0)
    pair = _pair(1)
    left = np.zeros((32, 32), dtype=np.int64)
    left[:, :16] = 1  # the partner's left half is the object
    pair.partner_label = left
    m = mask_target_quality(model, [pair], [setting])[setting]
    assert m["target_empty"] == 0
    assert m["target_precision"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["target_recall"] == pytest.approx(1.0)


def test_no_pairs_is_an_error(built):
    model, _ = built
    with pytest.raises(ValueError, match="no pairs"):
        mask_target_quality(model, [])


def test_bench_mask_targets_measures_the_curated_pairs_of_a_world_and_writes_its_section(built, tmp_path):
    from ovseg.curation import synthetic as syn

    _, checkpoint = built
    out = tmp_path / "bench"
    cfg = syn.WorldConfig(n_train=6, n_val=2, n_test=2, image_size=64)
    syn.generate(out / "world", cfg)
    classes = syn.classes(cfg)
    # a manifest whose sample ids are not the image numbers, and pairs on the world's real objects
    ids = [10 + i for i in range(6)]
    (out / "data" / "manifest").mkdir(parents=True)
    pl.DataFrame({"sample_id": ids, "url": [f"http://127.0.0.1:1/images/{i:06d}.jpg" for i in range(6)]}).write_parquet(
        out / "data" / "manifest" / "part-0.parquet")
    shapes = [{o.shape for o in syn.make_sample(cfg, "train", i)[0].objects} for i in range(6)]
    rows = [(ids[a], ids[b], s) for a in range(6) for b in range(6) if a != b for s in sorted(shapes[a] & shapes[b])]
    rows.append((ids[0], ids[1], "thing"))  # not a class: left out
    assert len(rows) > 1
    pl.DataFrame(rows, schema=["sample_id", "partner_id", "entity"], orient="row").write_parquet(out / "data" / "pairs.parquet")
    doc = tmp_path / "benchmarks.md"
    result = CliRunner().invoke(app, ["bench", "mask-targets", f"untrained={checkpoint}", "--out", str(out),
                                      "--pairs", "100", "--doc", str(doc), "--results", str(tmp_path / "results"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "<!-- bench:mask-targets -->" in text
    n_class_pairs = len(rows) - 1
    # the test preset's own setting, and the paper's form of the loss
    assert f"| untrained | assignment | 2 | dice | {n_class_pairs} |" in text
    assert f"| untrained | assignment | 4 | dice | {n_class_pairs} |" in text


def test_bench_mask_targets_without_a_benchmark_folder_is_a_clear_error(built, tmp_path):
    _, checkpoint = built
    result = CliRunner().invoke(app, ["bench", "mask-targets", str(checkpoint), "--out", str(tmp_path / "none"),
                                      "--doc", str(tmp_path / "doc.md"), "--results", str(tmp_path / "results")])
    assert result.exit_code == 2
    assert "run `ovseg bench synthetic" in result.output
    missing = CliRunner().invoke(app, ["bench", "mask-targets", str(tmp_path / "no.pt"), "--doc", str(tmp_path / "doc.md"), "--results", str(tmp_path / "results")],
                                 env={"COLUMNS": "300"})
    assert missing.exit_code == 2 and "is not a file" in missing.output
