"""Each benchmark loader on a fixture folder in its real layout, and missing-data errors."""

import json

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
    assert label[5, 5] == 2  # category 18 is the second category -> id 2
    assert label[11, 21] == 1 and label[15, 28] == 0


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
