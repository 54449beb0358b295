"""Benchmark data sets in their standard folder layouts (mmsegmentation's), read lazily.

Every data set yields (image, label) with the image as an (H, W, 3) uint8 array and the label as
an (H, W) int64 array in which 255 is ignored. A data set knows its class names as the benchmark
defines them, the names used in prompts (e.g. "pottedplant" -> "potted plant"), whether label 0
is a background class that the segmenter predicts by threshold, its palette, and the paper's
background threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg.evaluation.metrics import IGNORE_INDEX
from ovseg.evaluation.pictures import load_rgb

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

CONTEXT59_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
]

COCO_OBJECT_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]

# The names benchmarks store are not always the words a caption would use. ovseg's renames
# (the soft and training-free protocols):
PROMPT_RENAMES = {
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "windowpane": "window",
    "ashcan": "trash can",
}


# The words the official code (GroupViT's segmentation/datasets/*.py, kept by OVSegmentor, and
# OVSegmentor's ade20k.py) puts into prompts, as renames of the stored class names; the paper
# protocol uses these. COCO-Object's stored names are already the official words, and ADE20K's
# official list is mmsegmentation's own (its "bed " with a trailing space tokenizes as "bed").
OFFICIAL_RENAMES = {
    "voc": {"diningtable": "table", "pottedplant": "plant", "tvmonitor": "monitor"},
    "context": {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"},
    "coco-object": {},
    "ade20k": {},
}
OFFICIAL_RENAMES["voc20"] = OFFICIAL_RENAMES["voc"]
OFFICIAL_RENAMES["context59"] = OFFICIAL_RENAMES["context"]


def voc_palette(n: int = 256) -> list[list[int]]:
    """PASCAL VOC's colour map: class bits spread over the high bits of R, G and B."""
    palette = []
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append([r, g, b])
    return palette


class DatasetNotFound(FileNotFoundError):
    """A data set folder or file is missing; the message says what and how to get it."""


@dataclass
class SegmentationDataset:
    """A list of (image, label) files plus what the benchmark says about its classes."""

    name: str
    root: Path
    items: list[tuple[Path, Path]]
    classes: list[str]
    has_background: bool
    bg_threshold: float | None
    palette: list[list[int]] = field(default_factory=voc_palette)
    label_offset: int = 0  # added to stored labels (e.g. -1 for reduce-zero-label layouts)
    zero_is_ignore: bool = False

    @property
    def prompt_classes(self) -> list[str]:
        """The foreground class names as written into prompts."""
        names = self.classes[1:] if self.has_background else self.classes
        return [PROMPT_RENAMES.get(n, n) for n in names]

    @property
    def official_prompt_classes(self) -> list[str]:
        """The foreground class names as the official code writes them into prompts (the
        stored names for a data set it does not know, e.g. the synthetic world)."""
        names = self.classes[1:] if self.has_background else self.classes
        renames = OFFICIAL_RENAMES.get(self.name, {})
        return [renames.get(n, n) for n in names]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.items[index]
        image = load_rgb(image_path)  # 16-bit greyscale scaled, not clipped white
        with Image.open(label_path) as raw:
            label = np.asarray(raw, dtype=np.int64).copy()  # palette PNGs read as indices
        if self.zero_is_ignore:
            ignore = (label == 0) | (label == IGNORE_INDEX)
            label = label + self.label_offset
            label[ignore] = IGNORE_INDEX
        return image, label

    def __iter__(self):
        for i in range(len(self)):
            yield self.load(i)


def _require(path: Path, how: str) -> Path:
    if not path.exists():
        raise DatasetNotFound(f"expected {path} ({how})")
    return path


def _locate(data: Path, *nested: str, marker: str) -> Path:
    """The data set's own folder: DATA/<nested...> when DATA holds it (e.g. VOCdevkit/VOC2012),
    DATA itself when it is that folder (it holds `marker`), else the standard place under DATA,
    so that a missing data set is reported with the full path it should be at."""
    root = Path(data)
    for name in nested:
        if (root / name).exists():
            root = root / name
    if root == Path(data) and not (root / marker).exists():
        root = root.joinpath(*nested)
    return root


def _split_items(root: Path, split_file: Path, image_dir: Path, label_dir: Path,
                 image_ext: str, label_suffix: str, how: str) -> list[tuple[Path, Path]]:
    _require(image_dir, how)
    _require(label_dir, how)
    ids = [line.strip() for line in _require(split_file, how).read_text().splitlines() if line.strip()]
    items = []
    for i in ids:
        image, label = image_dir / f"{i}{image_ext}", label_dir / f"{i}{label_suffix}"
        _require(image, how)
        _require(label, how)
        items.append((image, label))
    return items


VOC_HOW = ("download VOCtrainval_11-May-2012.tar from the PASCAL VOC site and extract it so that "
           "DATA/VOCdevkit/VOC2012 exists; see docs/evaluation.md")
CONTEXT_HOW = ("PASCAL Context: VOC2010 images plus the Context labels converted with mmsegmentation's "
               "tools/dataset_converters/pascal_context.py; see docs/evaluation.md")
COCO_HOW = ("COCO-Object: COCO val2017 images and masks made by `python -m ovseg.evaluation.coco_convert`; "
            "see docs/evaluation.md")
ADE_HOW = "download ADEChallengeData2016.zip and extract it under DATA; see docs/evaluation.md"
SYNTHETIC_HOW = "make it with `ovseg curate synthetic OUT`; pass OUT/voc"


def load_voc(data: Path, split: str = "val", with_background: bool = True) -> SegmentationDataset:
    root = _locate(data, "VOCdevkit", "VOC2012", marker="JPEGImages")
    if (root / "classes.json").exists():  # the VOC layout with other classes: VOC's names would be wrong
        raise ValueError(f"{root} holds its own classes.json (ovseg's synthetic world), not PASCAL VOC; "
                         "use `ovseg eval synthetic`")
    items = _split_items(root, root / "ImageSets" / "Segmentation" / f"{split}.txt",
                         root / "JPEGImages", root / "SegmentationClass", ".jpg", ".png", VOC_HOW)
    if with_background:
        return SegmentationDataset("voc", root, items, VOC_CLASSES, True, 0.95)
    return SegmentationDataset("voc20", root, items, VOC_CLASSES[1:], False, None,
                               palette=voc_palette()[1:], label_offset=-1, zero_is_ignore=True)


def load_context(data: Path, split: str = "val", with_background: bool = True) -> SegmentationDataset:
    root = _locate(data, "VOCdevkit", "VOC2010", marker="JPEGImages")
    items = _split_items(root, root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                         root / "JPEGImages", root / "SegmentationClassContext", ".jpg", ".png", CONTEXT_HOW)
    if with_background:
        return SegmentationDataset("context", root, items, ["background", *CONTEXT59_CLASSES], True, 0.35)
    return SegmentationDataset("context59", root, items, CONTEXT59_CLASSES, False, None,
                               palette=voc_palette()[1:], label_offset=-1, zero_is_ignore=True)


def _items_by_label(image_dir: Path, label_dir: Path, label_suffix: str, how: str) -> list[tuple[Path, Path]]:
    """Pairs for layouts without a split file: every `<stem><label_suffix>` in label_dir with
    its `<stem>.jpg` in image_dir."""
    _require(image_dir, how)
    _require(label_dir, how)
    items = []
    for label in sorted(label_dir.glob(f"*{label_suffix}")):
        image = image_dir / (label.name.removesuffix(label_suffix) + ".jpg")
        items.append((_require(image, how), label))
    if not items:
        raise DatasetNotFound(f"expected *{label_suffix} label files in {label_dir} ({how})")
    return items


def load_coco_object(data: Path, split: str = "val2017") -> SegmentationDataset:
    root = _locate(data, "coco_stuff164k", marker="images")
    items = _items_by_label(root / "images" / split, root / "annotations" / split, "_instanceTrainIds.png", COCO_HOW)
    return SegmentationDataset("coco-object", root, items, COCO_OBJECT_CLASSES, True, 0.9)


def load_ade20k(data: Path, split: str = "validation") -> SegmentationDataset:
    root = _locate(data, "ADEChallengeData2016", marker="images")
    items = _items_by_label(root / "images" / split, root / "annotations" / split, ".png", ADE_HOW)
    # Stored labels: 0 = "other" (ignored), 1..150 = classes (mmseg's reduce_zero_label).
    return SegmentationDataset("ade20k", root, items, ADE20K_CLASSES, False, None,
                               palette=voc_palette()[1:], label_offset=-1, zero_is_ignore=True)


def load_synthetic(data: Path, split: str = "test") -> SegmentationDataset:
    """The synthetic world's VOC-layout split (`OUT/voc` of `ovseg curate synthetic`)."""
    root = Path(data)
    if (root / "voc").exists():
        root = root / "voc"
    meta = json.loads(_require(root / "classes.json", SYNTHETIC_HOW).read_text())
    items = _split_items(root, root / "ImageSets" / "Segmentation" / f"{split}.txt",
                         root / "JPEGImages", root / "SegmentationClass", ".jpg", ".png", SYNTHETIC_HOW)
    classes = list(meta["classes"])
    if classes[0] != "background":
        raise ValueError(f"{root / 'classes.json'}: the first class must be 'background'")
    return SegmentationDataset("synthetic", root, items, classes, True, None,
                               palette=meta.get("palette") or voc_palette())


LOADERS = {
    "voc": load_voc,
    "context": load_context,
    "coco-object": load_coco_object,
    "ade20k": load_ade20k,
    "synthetic": load_synthetic,
}
