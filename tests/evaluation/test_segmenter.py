"""The zero-shot segmenter's logic, on a local fake model with known answers."""

import numpy as np
import pytest
import torch

from ovseg.evaluation.segmenter import Protocol, ZeroShotSegmenter

from .conftest import red_square_image


def _segmenter(model, protocol, **kw):
    return ZeroShotSegmenter(model, ["circle", "square", "star"], protocol=protocol, **kw)


def test_red_group_is_labelled_with_its_class_and_rest_by_threshold(redness_model):
    image, label = red_square_image()
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16), bg_threshold=0.5)
    pred = seg.predict(image)
    # red pixels -> group 0 -> "circle" -> label 1; the other group is "square" -> label 2
    assert (pred[label == 1] == 1).mean() > 0.95
    assert (pred[label == 0] == 2).mean() > 0.95


def test_threshold_above_every_score_gives_all_background(redness_model):
    image, _ = red_square_image()
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16), bg_threshold=1.01)
    assert (seg.predict(image) == 0).all()


def test_without_background_labels_are_class_indices(redness_model):
    image, label = red_square_image()
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16), with_background=False)
    pred = seg.predict(image)
    assert set(np.unique(pred)) <= {0, 1}
    assert (pred[label == 1] == 0).mean() > 0.95


def test_sliding_window_equals_whole_image_when_window_covers_image(redness_model):
    image, _ = red_square_image()
    seg = _segmenter(redness_model, Protocol("t", 32, 64, 32))
    slid, _ = seg.scores(image, slide=True)
    whole, _ = seg.scores(image, slide=False)
    torch.testing.assert_close(slid, whole)


def test_overlapping_windows_agree_with_whole_image_for_a_local_model(redness_model):
    image, _ = red_square_image(size=48, box=(4, 12, 40, 28))
    seg = _segmenter(redness_model, Protocol("t", 48, 16, 8))
    redness_model.calls = 0
    slid, _ = seg.scores(image, slide=True)
    assert redness_model.calls >= 2  # really went window by window
    whole, _ = seg.scores(image, slide=False)
    # Bilinear upsampling of the patch grid differs only within half a patch of a window edge
    # that crosses an object edge; everywhere else the scores, and the labels, agree.
    close = (slid - whole).abs().amax(0) < 1e-5
    assert close.float().mean() > 0.97
    assert (seg.predict_from_scores(slid) == seg.predict_from_scores(whole)).mean() > 0.99


def test_image_is_resized_to_protocol_short_side_and_back(redness_model):
    image, label = red_square_image()
    seg = _segmenter(redness_model, Protocol("t", 64, 64, 32), bg_threshold=0.5)
    scores, groups = seg.scores(image, with_groups=True)
    assert scores.shape == (3, 32, 32) and groups.shape == (2, 32, 32)
    assert (seg.predict_from_scores(scores)[label == 1] == 1).mean() > 0.9


def test_top_k_filter_drops_classes_the_image_does_not_match(redness_model):
    image, _ = red_square_image()
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16), top_k=1, bg_threshold=0.0)
    pred = seg.predict(image)
    assert len(set(np.unique(pred)) - {0}) == 1


def test_class_embeddings_are_cached_per_vocabulary(redness_model):
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16))
    first = seg.class_embeddings()
    assert seg.class_embeddings() is first
    seg.class_names = ["star"]
    assert seg.class_embeddings().shape[0] == 1


def test_ensemble_of_templates_is_normalised(redness_model):
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16),
                     templates=("a photo of a {}.", "an image of a {}."))
    emb = seg.class_embeddings()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_small_images_are_batched_across_images_in_one_forward_pass(redness_model):
    images = [red_square_image(box=(4 * k, 4, 4 * k + 12, 20))[0] for k in range(4)]
    seg = _segmenter(redness_model, Protocol("t", 32, 32, 16), batch_size=4)
    redness_model.calls = 0
    batched = seg.scores_batch(images, with_groups=True)
    assert redness_model.calls == 1
    for image, (scores, groups) in zip(images, batched):
        alone, alone_groups = seg.scores(image, with_groups=True)
        torch.testing.assert_close(scores, alone)
        torch.testing.assert_close(groups, alone_groups)
