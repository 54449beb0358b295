"""`ovseg eval synthetic` and `ovseg segment` end to end with a real (tiny, untrained) model
checkpoint and a real synthetic-world split."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ovseg.cli.main import app


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ovseg.training.config import resolve, to_dict
    from ovseg.training.model import build_model
    from ovseg.training.tokenizer import tokenizer_to_json, train_wordpiece

    cfg = resolve("test", overrides=["model.image_size=64"])
    tokenizer = train_wordpiece(["a photo of a red circle and a blue star on a striped background"] * 3, vocab_size=200)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "tokenizer": tokenizer_to_json(tokenizer)}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ovseg.curation.synthetic import WorldConfig, generate

    return generate(tmp_path_factory.mktemp("world"), WorldConfig(n_train=4, n_val=4, n_test=6, image_size=64))


def test_eval_synthetic_writes_metrics_and_pictures(checkpoint, world, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "synthetic", "--checkpoint", str(checkpoint), "--data", str(world / "voc"),
                                      "--output", str(out), "--tune-threshold-on", "val", "--save-pictures", "2",
                                      "--diagnostics", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    classes = json.loads((world / "voc" / "classes.json").read_text())["classes"]
    assert set(metrics["per_class"]) == set(classes)
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["n_images"] == 6
    assert 0.0 < metrics["bg_threshold"] < 1.0  # chosen on val
    assert 0.0 <= metrics["group_majority_miou"] <= 1.0
    assert len(list((out / "pictures").glob("*_panel.png"))) == 2
    assert "mIoU" in result.output
    assert json.loads((out / "eval_config.json").read_text())["protocol"] == metrics["protocol"] == "synthetic"


def test_threshold_cannot_be_tuned_on_the_measured_split(checkpoint, world, tmp_path):
    result = CliRunner().invoke(app, ["eval", "synthetic", "--checkpoint", str(checkpoint), "--data", str(world),
                                      "--split", "test", "--tune-threshold-on", "test", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "another split" in result.output


def test_the_library_refuses_to_tune_on_the_default_split_it_measures(checkpoint, world):
    """split=None measures the loader's default split (test for the synthetic world); tuning on
    "test" then would choose the threshold on the measured images."""
    from ovseg.evaluation.evaluate import run_evaluation

    with pytest.raises(ValueError, match="another split"):
        run_evaluation("synthetic", world, checkpoint, split=None, tune_threshold_on="test", device="cpu")


def test_the_library_refuses_a_tuning_split_that_shares_images_with_the_measured_one(checkpoint, world):
    from ovseg.evaluation.evaluate import run_evaluation

    splits = world / "voc" / "ImageSets" / "Segmentation"
    shared = splits / "valtest.txt"
    shared.write_text((splits / "val.txt").read_text() + (splits / "test.txt").read_text())
    try:
        with pytest.raises(ValueError, match="shares 6 images with test"):
            run_evaluation("synthetic", world, checkpoint, tune_threshold_on="valtest", device="cpu")
    finally:
        shared.unlink()


def test_eval_help_explains_each_protocol():
    result = CliRunner().invoke(app, ["eval", "voc", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for words in ("paper: the official", "soft: the same windows", "training-free: short side 336", "top 5"):
        assert words in text, words


def test_an_unknown_protocol_is_a_one_line_error(checkpoint, tmp_path):
    data = _voc_with_two_wide_images(tmp_path / "data")
    result = CliRunner().invoke(app, ["eval", "voc", "--checkpoint", str(checkpoint), "--data", str(data),
                                      "--protocol", "official", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown protocol 'official'" in result.output


def test_segment_writes_overlay_labels_and_groups(checkpoint, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["segment", str(image), "--checkpoint", str(checkpoint), "--vocab", "circle, star",
                                      "--output", str(out), "--groups", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    labels = np.asarray(Image.open(out / "photo_labels.png"))
    assert labels.shape == (50, 70) and labels.max() <= 2
    assert Image.open(out / "photo_overlay.png").size[0] > 70  # image plus legend
    assert (out / "photo_groups.png").exists()


def test_segment_without_words_is_an_error(checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["segment", str(checkpoint), "--checkpoint", str(checkpoint), "--vocab", " , "])
    assert result.exit_code == 2 and "--vocab" in result.output


def test_batched_inference_of_mixed_sizes_equals_one_image_at_a_time_with_the_real_model(checkpoint):
    from ovseg.evaluation.segmenter import Protocol, ZeroShotSegmenter
    from ovseg.training.checkpoint import load_model

    torch.set_num_threads(1)
    model = load_model(checkpoint)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(64, 64, 3), (64, 100, 3), (64, 64, 3), (90, 64, 3)]]
    seg = ZeroShotSegmenter(model, ["circle", "star", "square"], protocol=Protocol("t", 64, 64, 32), batch_size=3)
    batched = seg.scores_batch(images)
    for image, (scores, _) in zip(images, batched):
        alone, _ = seg.scores(image)
        assert scores.shape == (3, *image.shape[:2])
        torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-4)


def _voc_with_two_wide_images(root):
    """VOCdevkit/VOC2012 with two 30x45 images: at the paper's short side 448 they become
    448x672, two sliding windows each."""
    from ovseg.evaluation.datasets import voc_palette

    from .conftest import write_palette_png

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("2007_000032", "2007_000033"):
        Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        label = np.zeros((30, 45), dtype=np.uint8)
        label[5:20, 10:30] = 15  # person
        label[0, :] = 255  # ignored border
        write_palette_png(voc / "SegmentationClass" / f"{name}.png", label, voc_palette())
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000033\n")
    return root


@pytest.mark.parametrize("protocol, name, n_classes, threshold", [
    ("paper", "voc", 21, 0.95), ("soft", "voc", 21, 0.95), ("training-free", "voc20", 20, None)])
def test_eval_voc_end_to_end_at_each_protocol(checkpoint, tmp_path, protocol, name, n_classes, threshold):
    data = _voc_with_two_wide_images(tmp_path / "data")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "voc", "--checkpoint", str(checkpoint), "--data", str(data),
                                      "--output", str(out), "--protocol", protocol, "--save-pictures", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == name and metrics["protocol"] == protocol and metrics["n_images"] == 2
    assert len(metrics["per_class"]) == n_classes and metrics["bg_threshold"] == threshold
    assert "person" in (out / "metrics.md").read_text()
    prediction = np.asarray(Image.open(out / "pictures" / "2007_000032_pred.png"))
    assert prediction.shape == (30, 45) and prediction.max() < n_classes


def test_sliding_window_equals_whole_image_for_the_real_model_when_the_window_covers_it(checkpoint):
    from ovseg.evaluation.segmenter import Protocol, ZeroShotSegmenter
    from ovseg.training.checkpoint import load_model

    model = load_model(checkpoint)
    image = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    seg = ZeroShotSegmenter(model, ["circle", "star"], protocol=Protocol("t", 48, 96, 48))
    slid, _ = seg.scores(image, slide=True)
    whole, _ = seg.scores(image, slide=False)
    torch.testing.assert_close(slid, whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_equal_cpu_scores_and_bf16_stays_a_valid_score_map(checkpoint):
    from ovseg.evaluation.segmenter import PROTOCOLS, ZeroShotSegmenter
    from ovseg.training.checkpoint import load_model

    image = np.random.default_rng(3).integers(0, 255, (75, 100, 3), dtype=np.uint8)
    names = ["circle", "star", "square"]
    cpu = ZeroShotSegmenter(load_model(checkpoint), names, protocol=PROTOCOLS["paper"])
    gpu_model = load_model(checkpoint, map_location="cuda")
    fp32 = ZeroShotSegmenter(gpu_model, names, protocol=PROTOCOLS["paper"], device="cuda", bf16=False)
    (on_cpu, _), = cpu.scores_batch([image])
    (on_gpu, groups), = fp32.scores_batch([image], with_groups=True)
    assert on_gpu.device.type == "cuda" and groups.device.type == "cpu"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=1e-3)
    bf16 = ZeroShotSegmenter(gpu_model, names, protocol=PROTOCOLS["paper"], device="cuda")
    (half, _), = bf16.scores_batch([image])
    # an untrained model's class probabilities are near-ties, so labels may flip under bf16;
    # the map must still be a valid score map: finite and in [0, 1]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert half.min() >= 0 and half.max() <= 1 + 1e-3


def test_an_unknown_scoring_is_a_one_line_error_before_any_work(checkpoint, world, tmp_path):
    result = CliRunner().invoke(app, ["eval", "synthetic", "--checkpoint", str(checkpoint), "--data", str(world),
                                      "--scoring", "argmax", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown scoring 'argmax'" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["segment", str(checkpoint), "--checkpoint", str(checkpoint), "--vocab", "circle",
                                      "--scoring", "argmax"])
    assert result.exit_code == 2 and "--scoring" in result.output



def test_batched_official_rule_equals_one_window_at_a_time_with_the_real_model(checkpoint):
    """The real model through the batched window loop, against GroupViT's slide inference read
    literally (tests/evaluation/test_official_rule.py) for the official rule."""
    from ovseg.evaluation.segmenter import Protocol, ZeroShotSegmenter
    from ovseg.training.checkpoint import load_model

    from .test_official_rule import official_labels_one_window_at_a_time

    torch.set_num_threads(1)
    model = load_model(checkpoint)
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(64, 100, 3), (90, 64, 3), (64, 64, 3)]]
    names = ["circle", "star", "square", "ring", "heart", "diamond", "hexagon"]  # 7 classes: top 5 matters
    seg = ZeroShotSegmenter(model, names, protocol=Protocol("t", 64, 64, 32, rule="official"), bg_threshold=0.95,
                            batch_size=3)
    for image, (scores, _) in zip(images, seg.scores_batch(images)):
        expected = official_labels_one_window_at_a_time(model, seg, image)
        assert (seg.predict_from_scores(scores) == expected).mean() > 0.999
