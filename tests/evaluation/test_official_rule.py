"""The paper protocol's labelling rule (GroupViT's segmentation inference, kept by OVSegmentor)
on hand-built cases: a fake model whose groups, group maps and image embedding are set by hand,
with one patch per pixel, so every expected score is a softmax worked out below."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.evaluation.segmenter import PROTOCOLS, Protocol, ZeroShotSegmenter

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


class HandModel(torch.nn.Module):
    """The API the segmenter relies on (`encode_image`, `encode_text`, `scale`), set by hand.

    Class word i is the unit vector e_i. `assign(crops)` gives the (B, K, h, w) group map and
    `vectors(crops)` the (B, K, D) group embeddings, both from the crop's pixels (values in
    [0, 1]: mean 0 and std 1); the image embedding is `image_vector` or the mean of the groups."""

    patch_size = 1
    image_size = 16
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(self, words, assign, vectors, scale, image_vector=None):
        super().__init__()
        self.words, self.assign, self.vectors = list(words), assign, vectors
        self.logit_scale_value, self.image_vector = scale, image_vector

    def scale(self):
        return torch.tensor(self.logit_scale_value)

    def encode_text(self, texts):
        return torch.stack([torch.eye(len(self.words))[[f" {w}." in t for w in self.words].index(True)]
                            for t in texts])

    def encode_image(self, images):
        groups = F.normalize(self.vectors(images), dim=-1)  # (B, K, D)
        if self.image_vector is None:
            embedding = F.normalize(groups.mean(1), dim=-1)
        else:
            embedding = F.normalize(torch.as_tensor(self.image_vector, dtype=torch.float32), dim=-1)
            embedding = embedding.expand(images.shape[0], -1)
        return SimpleNamespace(embedding=embedding, group_embeddings=groups, assignment=self.assign(images))


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64))
    return e / e.sum()


def is_colour(crops, rgb):
    target = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255
    return ((crops - target).abs().amax(1) < 0.05).float()  # (B, h, w)


def fixed(vectors):
    return lambda crops: torch.tensor(vectors, dtype=torch.float32)[None].expand(crops.shape[0], -1, -1)


def red_or_rest(crops):
    red = is_colour(crops, RED)
    return torch.stack([red, 1 - red], dim=1)  # (B, 2, h, w): group 0 = red pixels


def one_window(name="t"):
    return Protocol(name, 16, 16, 8, rule="official")


def image_with(columns, height=16):
    """An image of coloured column bands: [(x0, x1, colour), ...]."""
    width = max(x1 for _, x1, _ in columns)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for x0, x1, colour in columns:
        image[:, x0:x1] = colour
    return image


def test_a_windows_best_group_keeps_its_class_even_below_the_threshold():
    """Scale 2. Group 0 (red, left) is exactly "a": softmax (2, 0, 0) gives a e^2/(e^2+2) = 0.787,
    and with all three classes in the top 5 its score is 0.787^2 = 0.619, below the threshold
    0.95. The cap min(0.95, 0.619) keeps it "a". Group 1 (right) leans equally to b and c: each
    0.445, score 0.198, below the cap: background. The soft rule, which thresholds the averaged
    scores without a cap, calls the whole image background."""
    model = HandModel("abc", red_or_rest, fixed([[1, 0, 0], [0, 1, 1]]), scale=2.0)
    image = image_with([(0, 8, RED), (8, 16, GREY)])
    seg = ZeroShotSegmenter(model, list("abc"), protocol=one_window(), bg_threshold=0.95)
    scores, _ = seg.scores(image)
    p_a = softmax([2, 0, 0])[0] ** 2
    p_b = softmax([0, 2 / 2 ** 0.5, 2 / 2 ** 0.5])[1] ** 2
    assert abs(p_a - 0.619) < 1e-3 and abs(p_b - 0.198) < 1e-3
    torch.testing.assert_close(scores[1, :, :8], torch.full((16, 8), p_a, dtype=torch.float32))
    torch.testing.assert_close(scores[2, :, 8:], torch.full((16, 8), p_b, dtype=torch.float32))
    assert (scores[0, :, :8] == 0).all() and (scores[0, :, 8:] == 1).all()  # background votes
    label = seg.predict(image)
    assert (label[:, :8] == 1).all() and (label[:, 8:] == 0).all()
    soft = ZeroShotSegmenter(model, list("abc"), protocol=Protocol("s", 16, 16, 8, rule="soft"), bg_threshold=0.95)
    assert (soft.predict(image) == 0).all()


def test_a_threshold_below_the_best_score_is_used_as_it_is():
    """Same groups at threshold 0.15: the cap is min(0.15, 0.619) = 0.15 and group 1's 0.198
    clears it, so its pixels take b (its first best class; b and c tie)."""
    model = HandModel("abc", red_or_rest, fixed([[1, 0, 0], [0, 1, 1]]), scale=2.0)
    seg = ZeroShotSegmenter(model, list("abc"), protocol=one_window(), bg_threshold=0.15)
    label = seg.predict(image_with([(0, 8, RED), (8, 16, GREY)]))
    assert (label[:, :8] == 1).all() and (label[:, 8:] == 2).all()


def test_a_class_outside_the_images_top_five_cannot_win_a_pixel():
    """Seven classes, the image embedding is e0+...+e4, so classes 5 and 6 are outside its top 5.
    The only group points mostly at class 6 (3 e6 + e2): its class-6 score is 0 (softmax over
    the top 5 gives it nothing), and the pixels take class 2, scored softmax over the top 5 of
    (0, 0, 4/sqrt(10), 0, 0) times the full softmax. The soft rule without top-k gives class 6."""
    words = "abcdefg"
    group = [0, 0, 1, 0, 0, 0, 3]
    model = HandModel(words, lambda crops: torch.ones(crops.shape[0], 1, *crops.shape[-2:]), fixed([group]),
                      scale=4.0, image_vector=[1, 1, 1, 1, 1, 0, 0])
    image = image_with([(0, 16, GREY)])
    seg = ZeroShotSegmenter(model, list(words), protocol=one_window(), bg_threshold=0.95)
    scores, _ = seg.scores(image)
    cosine = np.array(group) / np.linalg.norm(group)
    expected = softmax(4 * cosine[:5])[2] * softmax(4 * cosine)[2]
    assert (scores[7] == 0).all()  # class 6 (channel 0 is background)
    torch.testing.assert_close(scores[3], torch.full((16, 16), expected, dtype=torch.float32))
    assert (seg.predict(image) == 3).all()  # the best group of the window: no background either
    soft = ZeroShotSegmenter(model, list(words), protocol=Protocol("s", 16, 16, 8), bg_threshold=0.0)
    assert (soft.predict(image) == 7).all()


def test_top_k_sets_how_many_image_level_classes_the_official_rule_keeps():
    words = "abcdefg"
    model = HandModel(words, lambda crops: torch.ones(crops.shape[0], 1, *crops.shape[-2:]),
                      fixed([[0, 0, 1, 0, 0, 0, 3]]), scale=4.0, image_vector=[1, 1, 1, 1, 1, 0, 0.5])
    seg = ZeroShotSegmenter(model, list(words), protocol=one_window(), top_k=6, with_background=False)
    assert (seg.predict(image_with([(0, 16, GREY)])) == 6).all()  # class 6 is now in the image's top 6


def test_each_pixel_belongs_to_one_group_not_a_sum_of_the_soft_map():
    """Every pixel is 0.4 group 0 ("a") and 0.3 each groups 1 and 2 (both "b"). The official rule
    gives every pixel group 0, the argmax, and its scores exactly; the soft rule's sum gives b
    0.6 against a 0.4."""
    def assign(crops):
        b, _, h, w = crops.shape
        return torch.tensor([0.4, 0.3, 0.3]).view(1, 3, 1, 1).expand(b, 3, h, w)

    model = HandModel("abc", assign, fixed([[1, 0, 0], [0, 1, 0], [0, 1, 0]]), scale=10.0)
    image = image_with([(0, 16, GREY)])
    seg = ZeroShotSegmenter(model, list("abc"), protocol=one_window(), with_background=False)
    scores, _ = seg.scores(image)
    group_0 = softmax([10, 0, 0]) ** 2
    for c in range(3):
        torch.testing.assert_close(scores[c], torch.full((16, 16), group_0[c], dtype=torch.float32))
    assert (seg.predict(image) == 0).all()
    soft = ZeroShotSegmenter(model, list("abc"), protocol=Protocol("s", 16, 16, 8), with_background=False)
    assert (soft.predict(image) == 1).all()


def _three_window_model():
    """Group 0: red pixels, cosines (0.9, 0, 0.436) to (a, b, c). Group 1: the other pixels, "b"
    itself when the crop shows blue, else halfway between b and c. Scale 4, all classes in the
    top 5, so a group's score is its softmax squared:
      red           a: softmax(3.6, 0, 1.744)[0]^2 = 0.845^2 = 0.714
      rest, blue    b: softmax(0, 4, 0)[1]^2       = 0.965^2 = 0.931
      rest, none    b = c: softmax(0, 2.83, 2.83)[1]^2 = 0.486^2 = 0.236"""
    red_vector = [0.9, 0.0, (1 - 0.81) ** 0.5]

    def vectors(crops):
        shows_blue = is_colour(crops, BLUE).flatten(1).amax(1)  # (B,)
        rest = torch.where(shows_blue[:, None] > 0, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
        return torch.stack([torch.tensor(red_vector).expand_as(rest), rest], dim=1)

    return HandModel("abc", red_or_rest, vectors, scale=4.0), red_vector


def test_background_votes_are_averaged_over_the_windows_that_cover_a_pixel():
    """A 16x32 image in three 16-wide windows with stride 8: [0, 16), [8, 24), [16, 32). Columns
    0-8 blue, 12-20 red, the rest grey. Threshold 0.9.
    Window 1 shows blue: the rest group scores 0.931 for b, so the cap is 0.9 and red (0.714)
    votes background. Windows 2 and 3 show no blue: red is their best group, the cap is 0.714,
    red keeps a and grey (0.236) votes background.
    Background share: columns 0-8 none of 1 window, 8-16 one of 2, 16-20 none of 2, 20-24 two
    of 2, 24-32 one of 1. Labels: 8-12 b ((0.931 + 0.236) / 2 = 0.583 beats 0.5), 12-16 a
    (0.714 beats 0.5), 16-20 a, 20-32 background."""
    model, red_vector = _three_window_model()
    image = image_with([(0, 8, BLUE), (8, 12, GREY), (12, 20, RED), (20, 32, GREY)])
    seg = ZeroShotSegmenter(model, list("abc"), protocol=Protocol("t", 16, 16, 8, rule="official"), bg_threshold=0.9)
    assert seg._windows(16, 32) == [(0, 0, 16, 16), (0, 8, 16, 24), (0, 16, 16, 32)]
    scores, _ = seg.scores(image)
    share = scores[0, 0]  # (W,) background share along a row
    expected_share = [0.0] * 8 + [0.5] * 8 + [0.0] * 4 + [1.0] * 12
    torch.testing.assert_close(share, torch.tensor(expected_share))
    p_red = softmax(4 * np.array(red_vector))[0] ** 2
    assert abs(float(scores[1, 0, 13]) - p_red) < 1e-5  # a at red, the same in both windows
    p_blue_b, p_none_b = softmax([0, 4, 0])[1] ** 2, softmax([0, 4 / 2 ** 0.5, 4 / 2 ** 0.5])[1] ** 2
    assert abs(float(scores[2, 0, 9]) - (p_blue_b + p_none_b) / 2) < 1e-5
    label = seg.predict(image)[0]
    assert label.tolist() == [2] * 12 + [1] * 8 + [0] * 12


def test_labels_for_thresholds_equal_a_segmenter_built_at_each_threshold():
    model, _ = _three_window_model()
    image = image_with([(0, 8, BLUE), (8, 12, GREY), (12, 20, RED), (20, 32, GREY)])
    protocol = Protocol("t", 16, 16, 8, rule="official")
    grid = (0.1, 0.5, 0.8, 0.95)
    seg = ZeroShotSegmenter(model, list("abc"), protocol=protocol, bg_threshold=0.5)
    (by_threshold,) = seg.labels_for_thresholds([image], grid)
    for t in grid:
        alone = ZeroShotSegmenter(model, list("abc"), protocol=protocol, bg_threshold=t).predict(image)
        np.testing.assert_array_equal(by_threshold[t], alone)
    assert not np.array_equal(by_threshold[0.1], by_threshold[0.95])
    with pytest.raises(ValueError, match="per window"):
        seg.predict_from_scores(seg.scores(image)[0], 0.8)


def test_paper_protocol_is_the_official_rule_and_soft_keeps_the_earlier_one():
    assert PROTOCOLS["paper"].rule == "official" and PROTOCOLS["paper"].prompts == "official"
    assert (PROTOCOLS["paper"].short_side, PROTOCOLS["paper"].window, PROTOCOLS["paper"].stride) == (448, 448, 224)
    assert PROTOCOLS["soft"].rule == "soft" and PROTOCOLS["training-free"].rule == "soft"
    with pytest.raises(ValueError, match="unknown labelling rule"):
        Protocol("x", 16, 16, 8, rule="hard")


def test_paper_protocol_resizes_the_long_side_to_at_most_2048():
    """mmseg's keep-ratio Resize to (2048, 448): a 10x100 image would be 448x4480 by its short
    side, so the long side's 2048 wins: 205x2048 (10 * 20.48 = 204.8, rounded half up)."""
    model = HandModel("abc", red_or_rest, fixed([[1, 0, 0], [0, 1, 0]]), scale=2.0)
    seg = ZeroShotSegmenter(model, list("abc"), protocol=PROTOCOLS["paper"])
    assert tuple(seg._prepare(np.zeros((10, 100, 3), np.uint8)).shape[-2:]) == (205, 2048)
    assert tuple(seg._prepare(np.zeros((375, 500, 3), np.uint8)).shape[-2:]) == (448, 597)


class _GroundingTrained(HandModel):
    cfg = SimpleNamespace(losses=["contrastive", "grounding"])
    grounding_scale, grounding_bias = torch.tensor(10.0), torch.tensor(-5.0)


def test_the_official_rule_scores_by_softmax_and_refuses_grounding():
    model = _GroundingTrained("abc", red_or_rest, fixed([[1, 0, 0], [0, 1, 0]]), scale=2.0)
    assert ZeroShotSegmenter(model, list("abc"), protocol=one_window()).scoring == "softmax"
    assert ZeroShotSegmenter(model, list("abc"), protocol=Protocol("s", 16, 16, 8)).scoring == "grounding"
    with pytest.raises(ValueError, match="--protocol soft"):
        ZeroShotSegmenter(model, list("abc"), protocol=one_window(), scoring="grounding")


def test_the_group_argmax_is_torchs_argmax_ties_included():
    from ovseg.evaluation.segmenter import _argmax_groups

    assignment = torch.randint(0, 3, (2, 5, 7, 9)).float()  # many ties
    torch.testing.assert_close(_argmax_groups(assignment), assignment.argmax(dim=1))


@torch.no_grad()
def official_labels_one_window_at_a_time(model, seg, image):
    """GroupViT's evaluation read literally: mmseg's slide inference, one window at a time, each
    window through `encode_decode` (one-hot group map, top-5 product, capped background vote),
    the per-window logits summed into the image and divided by the window count, resized to the
    image, argmax. Written from the official code's description, apart from the segmenter."""
    x = seg._prepare(image)  # (1, 3, h, w)
    _, _, h, w = x.shape
    text = seg.class_embeddings()  # (C, D)
    n_fg = text.shape[0]
    scale = min(float(model.scale()), 100.0)
    crop, stride = seg.protocol.window, seg.protocol.stride
    preds = torch.zeros(1, n_fg + 1, h, w)
    count = torch.zeros(1, 1, h, w)
    for row in range(max(h - crop + stride - 1, 0) // stride + 1):
        for col in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(row * stride + crop, h), min(col * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = x[:, :, y1:y2, x1:x2]
            out = model.encode_image(window)
            attn = F.interpolate(out.assignment.float(), size=window.shape[-2:], mode="bilinear", align_corners=False)
            attn = attn[0].permute(1, 2, 0)  # (h, w, K)
            onehot = F.one_hot(attn.argmax(-1), attn.shape[-1]).float()
            groups = F.normalize(out.group_embeddings[0].float(), dim=-1)
            avg = F.normalize(out.embedding.float(), dim=-1)
            affinity = groups @ text.T * scale  # (K, C)
            pre = affinity.softmax(-1)
            top = (avg @ text.T * scale).softmax(-1).topk(min(5, n_fg), dim=-1).indices
            mask = torch.zeros(1, n_fg, dtype=torch.bool)
            mask[0, top[0]] = True
            affinity = affinity.masked_fill(~mask, float("-inf")).softmax(-1) * pre
            logits = torch.zeros(n_fg + 1, *window.shape[-2:])
            logits[1:] = (onehot @ affinity).permute(2, 0, 1)
            threshold = min(seg.bg_threshold, affinity.max().item())
            logits[0, (onehot @ affinity).max(-1).values < threshold] = 1
            preds += F.pad(logits[None], (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    preds = F.interpolate(preds / count, size=image.shape[:2], mode="bilinear", align_corners=False)
    return preds[0].argmax(0).numpy()



class RandomLocalModel(torch.nn.Module):
    """A fixed random model whose outputs depend on the crop: patches are softly assigned to K
    groups by a random projection of their colour, a group's embedding is a random projection of
    its mean colour plus a group bias, and each class word gets a random embedding. Windows of one
    image therefore see different groups and scores."""

    patch_size, image_size = 4, 32
    image_mean, image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, words, groups=4, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.words = list(words)
        self.route = torch.randn(3, groups, generator=g) * 3
        self.project = torch.randn(3, dim, generator=g)
        self.bias = torch.randn(groups, dim, generator=g)
        self.text = F.normalize(torch.randn(len(words), dim, generator=g), dim=-1)

    def scale(self):
        return torch.tensor(30.0)

    def encode_text(self, texts):
        return torch.stack([self.text[[f" {w}." in t for w in self.words].index(True)] for t in texts])

    def encode_image(self, images):
        patches = F.avg_pool2d(images, self.patch_size)  # (B, 3, h, w)
        assignment = torch.einsum("bchw,ck->bkhw", patches, self.route).softmax(dim=1)  # (B, K, h, w)
        weights = assignment.flatten(2) / assignment.flatten(2).sum(-1, keepdim=True).clamp(min=1e-6)
        colour = torch.einsum("bkn,bcn->bkc", weights, patches.flatten(2))  # (B, K, 3)
        groups = F.normalize(colour @ self.project + self.bias, dim=-1)  # (B, K, D)
        return SimpleNamespace(embedding=F.normalize(groups.mean(1), dim=-1), group_embeddings=groups,
                               assignment=assignment)


@pytest.mark.parametrize("threshold", [0.999, 0.95, 0.5, 0.2])
def test_batched_official_rule_equals_groupvits_slide_inference_one_window_at_a_time(threshold):
    words = ["circle", "star", "square", "ring", "heart", "diamond", "hexagon"]  # 7: the top 5 matters
    model = RandomLocalModel(words)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(32, 80, 3), (70, 32, 3), (32, 32, 3), (40, 56, 3)]]
    seg = ZeroShotSegmenter(model, words, protocol=Protocol("t", 32, 32, 16, rule="official"),
                            bg_threshold=threshold, batch_size=3)
    labels_seen = set()
    for image, (scores, _) in zip(images, seg.scores_batch(images)):
        expected = official_labels_one_window_at_a_time(model, seg, image)
        ours = seg.predict_from_scores(scores)
        assert (ours == expected).mean() > 0.999
        labels_seen |= set(np.unique(expected).tolist())
    assert len(labels_seen) >= 2  # not one flat map (lower thresholds show up to five classes)
