"""Metrics from the confusion matrix, against hand-computed values and a plain implementation."""

import math

import numpy as np
import pytest

from ovseg.evaluation.metrics import ConfusionMatrix, SegmentationMetrics, group_majority_labels


def test_iou_matches_hand_computation_with_ignore_and_absent_class():
    truth = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 1]])
    cm = ConfusionMatrix(4)
    cm.update(truth, pred)
    m = cm.compute(["bg", "a", "b", "absent"])
    # class 0: tp 2 (two zeros predicted 0), truth 3, pred 3 (incl. the 0 at a class-1 pixel) -> 2/4
    # class 1: tp 3, truth 4, pred 4 -> 3/5; class 2: predicted only on an ignored pixel -> no union
    assert m.iou[0] == pytest.approx(2 / 4)
    assert m.iou[1] == pytest.approx(3 / 5)
    assert math.isnan(m.iou[2]) and math.isnan(m.iou[3])
    assert m.miou == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert m.pixel_accuracy == pytest.approx(5 / 7)
    assert m.mean_accuracy == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m.n_pixels == 7


def test_false_positive_class_counts_as_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1]), np.array([0, 2, 1]))
    m = cm.compute()
    assert m.iou[2] == 0.0  # predicted, never true: IoU 0, and it lowers the mean
    assert m.miou == pytest.approx((1 / 2 + 1 + 0) / 3)


def _plain_miou(truth, pred, n):
    ious = []
    for c in range(n):
        t, p = (truth == c) & (truth != 255), (pred == c) & (truth != 255)
        union = (t | p).sum()
        if union:
            ious.append((t & p).sum() / union)
    return float(np.mean(ious))


def test_streaming_matches_plain_implementation_on_random_maps():
    rng = np.random.default_rng(0)
    n = 6
    cm = ConfusionMatrix(n)
    truths, preds = [], []
    for _ in range(5):
        truth = rng.integers(0, n, size=(17, 23))
        truth[rng.random(truth.shape) < 0.1] = 255
        pred = np.where(rng.random(truth.shape) < 0.6, truth % n, rng.integers(0, n, truth.shape))
        pred[pred == 255] = 0
        cm.update(truth, pred)
        truths.append(truth), preds.append(pred)
    expected = _plain_miou(np.concatenate([t.ravel() for t in truths]),
                           np.concatenate([p.ravel() for p in preds]), n)
    assert cm.compute().miou == pytest.approx(expected)


def test_out_of_range_prediction_is_an_error():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError):
        cm.update(np.array([0, 1]), np.array([0, 5]))


def test_write_produces_json_and_markdown(tmp_path):
    m = SegmentationMetrics.from_matrix(np.array([[3, 1], [0, 4]]), ["bg", "cat"])
    m.write(tmp_path, title="t", extra={"dataset": "x"})
    import json

    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["dataset"] == "x"
    assert payload["per_class"]["cat"]["iou"] == pytest.approx(4 / 5)
    assert "| cat | 80.00 |" in (tmp_path / "metrics.md").read_text()


def test_group_majority_gives_each_group_its_most_common_label():
    truth = np.array([[1, 1, 2, 2]])
    groups = np.zeros((2, 1, 4))
    groups[0, 0, :3] = 1.0  # group 0 covers 1,1,2 -> majority 1
    groups[1, 0, 3] = 1.0   # group 1 covers 2 -> 2
    assert group_majority_labels(groups, truth, 3).tolist() == [[1, 1, 1, 2]]
