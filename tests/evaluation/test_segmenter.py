"""The zero-shot segmenter's logic, on a local fake model with known answers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


class _FaintGroupModel(torch.nn.Module):
    """Two groups over a 4-d text space: group 0 is exactly "circle"; group 1 leans slightly
    towards "square" (cosine 0.3) and is mostly a direction no class has, like background that
    shares a little with one class. Trained with the grounding loss (cfg.losses)."""

    patch_size, image_size = 4, 32
    image_mean, image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(losses=["contrastive", "entity", "grounding"])
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(100.0)), requires_grad=False)
        self.grounding_scale = torch.nn.Parameter(torch.tensor(10.0), requires_grad=False)
        self.grounding_bias = torch.nn.Parameter(torch.tensor(-5.0), requires_grad=False)

    def encode_text(self, texts):
        words = ["circle", "square", "star"]
        return torch.stack([torch.eye(4)[next(i for i, w in enumerate(words) if f" {w}." in t)] for t in texts])

    def encode_image(self, images):
        from types import SimpleNamespace

        b, _, h, w = images.shape
        faint = torch.tensor([0.0, 0.3, 0.0, (1 - 0.09) ** 0.5])
        groups = torch.stack([torch.eye(4)[0], faint])[None].expand(b, -1, -1)
        left = torch.zeros(b, 1, h // 4, w // 4)
        left[..., : w // 8] = 1.0
        return SimpleNamespace(embedding=F.normalize(groups.mean(1), dim=-1), group_embeddings=groups,
                               assignment=torch.cat([left, 1 - left], dim=1))


def test_grounding_scoring_leaves_a_group_that_only_leans_towards_a_class_as_background():
    """Softmax over the classes gives the faint group "square" with near certainty (its other
    cosines are 0), so no threshold below 1 keeps it background; the grounding head's presence
    probability, sigmoid(10 * 0.3 - 5) = 0.12, does at its own boundary of 0.5, while the
    group that is a circle stays a circle."""
    model = _FaintGroupModel()
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    softmax = ZeroShotSegmenter(model, ["circle", "square", "star"], protocol=Protocol("t", 32, 32, 16),
                                scoring="softmax", bg_threshold=0.5)
    grounding = ZeroShotSegmenter(model, ["circle", "square", "star"], protocol=Protocol("t", 32, 32, 16),
                                  bg_threshold=0.5)
    assert grounding.scoring == "grounding"  # auto: the model trained with the grounding loss
    soft_pred, ground_pred = softmax.predict(image), grounding.predict(image)
    assert (soft_pred[:, 20:] == 2).all() and (ground_pred[:, 20:] == 0).all()
    assert (soft_pred[:, :12] == 1).all() and (ground_pred[:, :12] == 1).all()
    scores, _ = grounding.scores(image)
    assert abs(float(scores[1, 0, 31]) - float(torch.sigmoid(torch.tensor(-2.0)))) < 1e-4


def test_auto_scoring_is_softmax_for_a_model_that_never_trained_grounding(redness_model):
    from ovseg.evaluation.segmenter import resolve_scoring

    assert resolve_scoring(redness_model) == "softmax"
    assert resolve_scoring(_FaintGroupModel(), "softmax") == "softmax"
    with pytest.raises(ValueError, match="unknown scoring"):
        resolve_scoring(redness_model, "argmax")
