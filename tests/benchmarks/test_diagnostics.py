"""Group diagnostics on a model whose groups and embeddings are set by hand."""

from dataclasses import dataclass, field

import numpy as np
import torch

from ovseg.benchmarks.diagnostics import group_diagnostics, group_probe
from ovseg.evaluation.datasets import SegmentationDataset


@dataclass
class Out:
    embedding: torch.Tensor
    group_embeddings: torch.Tensor
    assignment: torch.Tensor
    groups: torch.Tensor = field(default=None)  # features before the projector


class HandModel:
    """Two classes (circle, square) as the two axes; the left half of the 4x4 grid is group 0,
    the right half group 1; group 0 says circle, group 1 says `right`; the image says circle."""

    image_size, image_mean, image_std = 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, right: str, blind: bool = False):
        self.right = right
        self.blind = blind  # features that are the same for every group

    def eval(self):
        return self

    def encode_text(self, prompts):
        return torch.tensor([[1.0, 0.0] if "circle" in p else [0.0, 1.0] for p in prompts])

    def encode_image(self, images):
        b = images.shape[0]
        assignment = torch.zeros(b, 2, 4, 4)
        assignment[:, 0, :, :2] = 1
        assignment[:, 1, :, 2:] = 1
        right = [1.0, 0.0] if self.right == "circle" else [0.0, 1.0]
        groups = torch.tensor([[1.0, 0.0], right]).expand(b, 2, 2)
        features = torch.ones(b, 2, 3) if self.blind else torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]).expand(b, 2, 3)
        return Out(torch.tensor([[1.0, 0.0]]).expand(b, 2), groups, assignment, features)


class Data(SegmentationDataset):
    def __init__(self, labels):
        super().__init__("hand", None, [(None, None)] * len(labels), ["background", "circle", "square"], True, None)
        self.labels = labels

    def load(self, index):
        return np.zeros((8, 8, 3), dtype=np.uint8), self.labels[index]


def test_groups_are_scored_against_their_majority_object_and_background_groups_are_left_out():
    left_circle_right_square = np.zeros((8, 8), dtype=np.int64)
    left_circle_right_square[:, :4], left_circle_right_square[:, 4:] = 1, 2
    left_circle_right_background = np.zeros((8, 8), dtype=np.int64)
    left_circle_right_background[:, :4] = 1
    data = Data([left_circle_right_square, left_circle_right_background])
    right = group_diagnostics(HandModel("square"), data)
    assert right == {"image_top1_present": 1.0, "group_accuracy": 1.0, "groups_per_image": 2.0}
    wrong = group_diagnostics(HandModel("circle"), data)
    assert wrong["group_accuracy"] == 2 / 3  # the square group is named circle; background groups do not count
    only_squares = Data([np.full((8, 8), 2, dtype=np.int64)])
    assert group_diagnostics(HandModel("square"), only_squares)["image_top1_present"] == 0.0
    only_background = Data([np.zeros((8, 8), dtype=np.int64)])
    assert np.isnan(group_diagnostics(HandModel("square"), only_background)["group_accuracy"])


def test_the_probe_reads_the_class_from_the_group_features_even_when_the_prompts_misname_it():
    halves = np.zeros((8, 8), dtype=np.int64)
    halves[:, :4], halves[:, 4:] = 1, 2  # circle | square: one object group of each class
    fit, test = Data([halves, halves]), Data([halves])
    misnamed = HandModel("circle")  # the square group is named circle, but its features differ
    assert group_diagnostics(misnamed, test)["group_accuracy"] == 0.5
    probe = group_probe(misnamed, fit, test)
    assert probe == {"probe_group_accuracy": 1.0, "probe_fit_groups": 4, "probe_test_groups": 2}
    assert group_probe(HandModel("circle", blind=True), fit, test)["probe_group_accuracy"] == 0.5
    assert np.isnan(group_probe(misnamed, Data([np.zeros((8, 8), dtype=np.int64)]), test)["probe_group_accuracy"])
