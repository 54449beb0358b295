"""Fixtures for evaluation tests: a local fake model that satisfies the OVSegmentor interface
(docs/architecture.md), and VOC-layout folders written on the fly."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


class RednessModel(torch.nn.Module):
    """Two groups: 'red' patches and the rest. Group 0 means `words[0]`, group 1 `words[1]`.

    Everything is local to a patch, so sliding-window and whole-image inference must agree."""

    patch_size = 4
    image_size = 32
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(self, words=("circle", "square"), vocabulary=("circle", "square", "star")):
        super().__init__()
        self.words = words
        self.vocabulary = list(vocabulary)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(100.0)), requires_grad=False)
        self.calls = 0

    def encode_text(self, texts):
        out = torch.zeros(len(texts), len(self.vocabulary))
        for i, t in enumerate(texts):
            for j, w in enumerate(self.vocabulary):
                if f" {w}." in t:
                    out[i, j] = 1.0
        return F.normalize(out + 1e-3, dim=-1)

    def encode_image(self, images):
        self.calls += 1
        b = images.shape[0]
        patches = F.avg_pool2d(images, self.patch_size)  # (B, 3, h, w)
        redness = patches[:, 0] - patches[:, 1:].mean(1)  # (B, h, w)
        red = torch.sigmoid(20 * (redness - 0.3))
        assignment = torch.stack([red, 1 - red], dim=1)  # (B, 2, h, w)
        groups = torch.stack([self.encode_text([f"a photo of a {w}."])[0] for w in self.words])
        groups = groups[None].expand(b, -1, -1)
        return SimpleNamespace(embedding=F.normalize(groups.mean(1), dim=-1),
                               group_embeddings=groups, assignment=assignment)


@pytest.fixture
def redness_model():
    return RednessModel()


def red_square_image(size=32, box=(8, 8, 24, 24)):
    image = np.full((size, size, 3), 30, dtype=np.uint8)
    y0, x0, y1, x1 = box
    image[y0:y1, x0:x1] = (220, 20, 20)
    label = np.zeros((size, size), dtype=np.uint8)
    label[y0:y1, x0:x1] = 1
    return image, label


def write_palette_png(path, label, palette):
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    flat = (palette + [[0, 0, 0]] * 256)[:256]
    img.putpalette([v for rgb in flat for v in rgb])
    img.save(path)


def make_voc_layout(root, ids, image_dir="JPEGImages", label_dir="SegmentationClass",
                    split_dir="ImageSets/Segmentation", split="val", label_fn=None):
    from ovseg.evaluation.datasets import voc_palette

    (root / image_dir).mkdir(parents=True)
    (root / label_dir).mkdir(parents=True)
    (root / split_dir).mkdir(parents=True)
    for i in ids:
        image, label = red_square_image()
        if label_fn is not None:
            label = label_fn(label)
        Image.fromarray(image).save(root / image_dir / f"{i}.jpg", quality=95)
        write_palette_png(root / label_dir / f"{i}.png", label, voc_palette())
    (root / split_dir / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
