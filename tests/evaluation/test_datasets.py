"""Each benchmark loader on a fixture folder in its real layout, and missing-data errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.evaluation import datasets as ds

from .conftest import make_voc_layout, red_square_image, write_palette_png


def test_voc_reads_palette_png_indices_and_split_file(tmp_path):
    root = make_voc_layout(tmp_path / "VOCdevkit" / "VOC2012", ["2007_000001", "2007_000002"])
    data = ds.load_voc(tmp_path)
    assert len(data) == 2 and data.root == root
    image, label = data.load(0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert len(data.classes) == 21 and data.has_background and data.bg_threshold == 0.95
    assert "potted plant" in data.prompt_classes and len(data.prompt_classes) == 20


def test_voc20_drops_background_and_shifts_labels(tmp_path):
    make_voc_layout(tmp_path / "VOC2012", ["a"])
    data = ds.load_voc(tmp_path, with_background=False)
    _, label = data.load(0)
    assert set(np.unique(label)) == {0, 255}  # aeroplane (1 -> 0); background -> ignored
    assert len(data.classes) == 20


def test_context_60_and_59(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    make_voc_layout(root, ["2008_000002"], label_dir="SegmentationClassContext",
                    split_dir="ImageSets/SegmentationContext")
    with_bg = ds.load_context(tmp_path)
    without = ds.load_context(tmp_path, with_background=False)
    assert len(with_bg.classes) == 60 and len(without.classes) == 59
    assert with_bg.bg_threshold == 0.35
    assert set(np.unique(without.load(0)[1])) == {0, 255}


def test_coco_object_layout(tmp_path):
    root = tmp_path / "coco_stuff164k"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations" / "val2017").mkdir(parents=True)
    image, label = red_square_image()
    Image.fromarray(image).save(root / "images" / "val2017" / "000000000139.jpg")
    label = label * 16  # cat
    label[0, 0] = 255
    Image.fromarray(label.astype(np.uint8)).save(root / "annotations" / "val2017" / "000000000139_instanceTrainIds.png")
    data = ds.load_coco_object(tmp_path)
    _, loaded = data.load(0)
    assert len(data.classes) == 81 and data.classes[16] == "cat"
    assert set(np.unique(loaded)) == {0, 16, 255} and data.bg_threshold == 0.9


def test_ade20k_reduces_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    image, label = red_square_image()
    Image.fromarray(image).save(root / "images" / "validation" / "ADE_val_00000001.jpg")
    Image.fromarray((label * 3).astype(np.uint8)).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
    data = ds.load_ade20k(tmp_path)
    _, loaded = data.load(0)
    assert len(data.classes) == 150
    assert set(np.unique(loaded)) == {2, 255}  # 3 -> 2 (sky), 0 ("other") -> ignored


def test_synthetic_reads_classes_json(tmp_path):
    root = tmp_path / "voc"
    make_voc_layout(root, ["000001"], split="test")
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "circle"],
                                                   "palette": [[0, 0, 0], [200, 0, 0]]}))
    data = ds.load_synthetic(tmp_path, split="test")
    assert data.prompt_classes == ["circle"] and data.palette[1] == [200, 0, 0]


def test_missing_label_file_names_the_path(tmp_path):
    root = make_voc_layout(tmp_path / "VOC2012", ["a", "b"])
    (root / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(ds.DatasetNotFound, match="b.png"):
        ds.load_voc(tmp_path)


def test_cli_missing_dataset_exits_2_with_expected_path(tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"not used")
    result = CliRunner().invoke(app, ["eval", "voc", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "JPEGImages" in result.output and "docs/evaluation.md" in result.output
    assert "Traceback" not in result.output


def test_cli_missing_checkpoint_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["eval", "synthetic", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "checkpoint not found" in result.output


def test_coco_converter_paints_contiguous_ids_and_loader_reads_them(tmp_path):
    pytest.importorskip("pycocotools")
    from ovseg.evaluation.coco_convert import convert

    images = tmp_path / "val2017"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "000000000001.jpg")
    payload = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 20, "width": 30}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"image_id": 1, "category_id": 18, "iscrowd": 0, "area": 100,
             "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
            {"image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4,
             "segmentation": [[20, 10, 22, 10, 22, 12, 20, 12]]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(payload))
    assert convert(tmp_path / "ann.json", images, tmp_path / "out") == 1
    data = ds.load_coco_object(tmp_path / "out")
    _, label = data.load(0)
    # COCO category 18 is the 17th thing class, whatever the file's category list holds
    assert label[5, 5] == 17 and data.classes[17] == "dog"
    assert label[11, 21] == 1 and label[15, 28] == 0


def _instances(tmp_path, annotations):
    images = tmp_path / "val2017"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "000000000001.jpg")
    payload = {"images": [{"id": 1, "file_name": "000000000001.jpg", "height": 20, "width": 30}],
               "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
               "annotations": annotations}
    (tmp_path / "ann.json").write_text(json.dumps(payload))
    return images


def test_coco_converter_paints_crowd_regions_with_their_class_not_ignore(tmp_path):
    """COCO-Stuff's thing maps, which GroupViT converts, keep crowd regions as their class."""
    pytest.importorskip("pycocotools")
    from ovseg.evaluation.coco_convert import convert

    crowd = np.zeros((20, 30), dtype=np.uint8)
    crowd[2:8, 15:25] = 1
    counts = []  # uncompressed column-major RLE, as COCO stores crowd regions
    value, run = 0, 0
    for v in crowd.flatten(order="F"):
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    images = _instances(tmp_path, [{"image_id": 1, "category_id": 1, "iscrowd": 1, "area": 60,
                                    "segmentation": {"counts": counts, "size": [20, 30]}}])
    convert(tmp_path / "ann.json", images, tmp_path / "out")
    _, label = ds.load_coco_object(tmp_path / "out").load(0)
    assert (label[2:8, 15:25] == 1).all() and (label == 1).sum() == 60 and not (label == 255).any()


def test_coco_converter_puts_the_first_annotation_on_top_where_instances_overlap(tmp_path):
    pytest.importorskip("pycocotools")
    from ovseg.evaluation.coco_convert import convert

    # a small person listed first over a large dog listed second: the person stays on top even
    # though it is smaller (no sort by area)
    images = _instances(tmp_path, [
        {"image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
        {"image_id": 1, "category_id": 18, "iscrowd": 0, "area": 100, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
    ])
    convert(tmp_path / "ann.json", images, tmp_path / "out")
    _, label = ds.load_coco_object(tmp_path / "out").load(0)
    assert label[4, 4] == 1 and label[8, 8] == 17
    payload = json.loads((tmp_path / "ann.json").read_text())
    payload["annotations"].reverse()
    (tmp_path / "ann.json").write_text(json.dumps(payload))
    convert(tmp_path / "ann.json", images, tmp_path / "out2")
    _, label = ds.load_coco_object(tmp_path / "out2").load(0)
    assert label[4, 4] == 17


def test_stuffthingmaps_conversion_is_groupvits_table(tmp_path):
    """GroupViT's converter: stored value v is COCO category v + 1; things -> 1..80 in category
    order, stuff (v > 90) and unlabeled (255) -> background 0."""
    from ovseg.evaluation.coco_convert import convert_stuffthingmaps

    maps, images = tmp_path / "maps", tmp_path / "val2017"
    maps.mkdir()
    images.mkdir()
    # person, dog, bench (category 15), toothbrush; stuff (92, 182), unlabeled, person
    stored = np.array([[0, 17, 14, 89], [91, 181, 255, 0]], dtype=np.uint8)
    Image.fromarray(stored).save(maps / "000000000001.png")
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(images / "000000000001.jpg")
    assert convert_stuffthingmaps(maps, images, tmp_path / "out") == 1
    data = ds.load_coco_object(tmp_path / "out")
    _, label = data.load(0)
    assert label.tolist() == [[1, 17, 14, 80], [0, 0, 0, 1]]
    assert [data.classes[i] for i in (1, 17, 14, 80)] == ["person", "dog", "bench", "toothbrush"]


@pytest.mark.parametrize("name, expected", [
    ("voc", "VOCdevkit/VOC2012/JPEGImages"), ("context", "VOCdevkit/VOC2010/JPEGImages"),
    ("coco-object", "coco_stuff164k/images/val2017"),
    ("ade20k", "ADEChallengeData2016/images/validation"), ("synthetic", "classes.json")])
def test_every_data_set_missing_exits_2_naming_the_expected_path_and_how_to_get_it(tmp_path, name, expected):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"never loaded: the data set is checked first")
    result = CliRunner().invoke(app, ["eval", name, "--checkpoint", str(ckpt), "--data", str(tmp_path / "absent"),
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and str(tmp_path / "absent") in result.output
    assert ("docs/evaluation.md" in result.output) or ("ovseg curate synthetic" in result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)


# The class words of the official code (GroupViT's segmentation/datasets/*.py, which OVSegmentor
# keeps, and OVSegmentor's ade20k.py), background left out: what the paper protocol must prompt.
OFFICIAL_VOC = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'table',
    'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train', 'monitor',
)
OFFICIAL_CONTEXT = (
    'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow',
    'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse',
    'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform', 'plant',
    'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track',
    'train', 'tree', 'truck', 'monitor', 'wall', 'water', 'window', 'wood',
)
OFFICIAL_COCO_OBJECT = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush',
)
OFFICIAL_ADE20K = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed ', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag',
)


@pytest.mark.parametrize("name, official", [
    ("voc", OFFICIAL_VOC), ("context", OFFICIAL_CONTEXT), ("coco-object", OFFICIAL_COCO_OBJECT),
    ("ade20k", OFFICIAL_ADE20K)])
def test_paper_protocol_prompts_the_official_class_words(name, official):
    from ovseg.evaluation.evaluate import make_segmenter

    from .conftest import RednessModel

    classes = {"voc": ds.VOC_CLASSES, "context": ["background", *ds.CONTEXT59_CLASSES],
               "coco-object": ds.COCO_OBJECT_CLASSES, "ade20k": ds.ADE20K_CLASSES}[name]
    with_background = name != "ade20k"
    data = ds.SegmentationDataset(name, Path("."), [], classes, with_background, 0.5 if with_background else None)
    # the official ADE20K list writes "bed " with a trailing space, which tokenizes as "bed"
    assert data.official_prompt_classes == [c.strip() for c in official]
    seg = make_segmenter(RednessModel(), data, protocol="paper")
    assert seg.class_names == [c.strip() for c in official] and seg.templates == ("a photo of a {}.",)
    soft = make_segmenter(RednessModel(), data, protocol="soft")
    assert soft.class_names == data.prompt_classes


def test_official_and_ovseg_words_differ_where_the_issue_says():
    voc = ds.SegmentationDataset("voc", Path("."), [], ds.VOC_CLASSES, True, 0.95)
    changed = {a: b for a, b in zip(voc.prompt_classes, voc.official_prompt_classes) if a != b}
    assert changed == {"dining table": "table", "potted plant": "plant", "tv monitor": "monitor"}
    ade = ds.SegmentationDataset("ade20k", Path("."), [], ds.ADE20K_CLASSES, False, None)
    changed = {a: b for a, b in zip(ade.prompt_classes, ade.official_prompt_classes) if a != b}
    assert changed == {"window": "windowpane", "trash can": "ashcan"}
