"""`ovseg segment` and the pictures on odd inputs: 16-bit greyscale, more than 255 classes,
repeated names, files that are not images (issue 26 items 5, 6, 13, 14)."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.evaluation.pictures import colourise, load_rgb, overlay_with_legend, palette_png

from .test_eval_cli import checkpoint, world  # noqa: F401  (the tiny real checkpoint and world)


def test_a_16_bit_greyscale_png_keeps_its_shades(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and 100 < rgb[0, 32, 0] < 160
    assert len(np.unique(rgb)) > 30  # not all white


def test_8_bit_images_read_as_pil_reads_them(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(image[..., 0]).save(tmp_path / "g.png")
    assert np.array_equal(load_rgb(tmp_path / "x.png"), image)
    assert np.array_equal(load_rgb(tmp_path / "g.png"), np.repeat(image[..., :1], 3, axis=2))


def test_more_than_255_classes_keep_their_ids_and_colours(tmp_path):
    from ovseg.evaluation.datasets import voc_palette

    names = [f"class{i}" for i in range(267)]
    label = np.arange(267).reshape(1, 267).repeat(3, axis=0)
    palette_png(label, voc_palette(), tmp_path / "labels.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "labels.png")), label)
    picture = overlay_with_legend(np.zeros((3, 267, 3), np.uint8), label, names, voc_palette(), ignore=None)
    assert picture.size[0] > 267
    colours = colourise(label, voc_palette(), ignore=None)
    assert not np.array_equal(colours[0, 260], colours[0, 4]) and not (colours[0, 255] == 255).all()


def test_segment_refuses_repeated_names_and_non_images_in_one_line(checkpoint, tmp_path):  # noqa: F811
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "seg"
    twice = CliRunner().invoke(app, ["segment", str(image), "-c", str(checkpoint), "--vocab", "circle,circle",
                                     "-o", str(out), "--device", "cpu"])
    assert twice.exit_code == 2 and "more than once" in twice.output
    nonimage = CliRunner().invoke(app, ["segment", str(bad), str(image), "-c", str(checkpoint), "--vocab", "circle",
                                        "-o", str(out), "--device", "cpu"])
    assert nonimage.exit_code == 2 and str(bad) in nonimage.output and "Traceback" not in nonimage.output
    assert len(nonimage.output.strip().splitlines()) == 1


def test_segment_of_two_files_with_one_name_writes_two_results(checkpoint, tmp_path):  # noqa: F811
    for folder, value in (("a", 0), ("b", 200)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((40, 40), value, np.uint16) * 300).save(tmp_path / folder / "x.png")
    out = tmp_path / "seg"
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                                      "-c", str(checkpoint), "--vocab", "circle", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "x_labels.png").exists() and (out / "x-2_labels.png").exists()


def test_segment_and_eval_name_a_damaged_checkpoint_in_one_line(checkpoint, world, tmp_path):  # noqa: F811
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:5000])
    seg = CliRunner().invoke(app, ["segment", str(image), "-c", str(cut), "--vocab", "circle", "-o",
                                   str(tmp_path / "o"), "--device", "cpu"])
    assert seg.exit_code == 2 and "cut.pt" in seg.output and "Traceback" not in seg.output
    assert len(seg.output.strip().splitlines()) == 1
    ev = CliRunner().invoke(app, ["eval", "synthetic", "--checkpoint", str(cut), "--data", str(world / "voc"),
                                  "--output", str(tmp_path / "e"), "--device", "cpu"])
    assert ev.exit_code == 2 and "cut.pt" in ev.output and "Traceback" not in ev.output


def test_eval_voc_refuses_the_synthetic_worlds_voc_layout(checkpoint, world, tmp_path):  # noqa: F811
    result = CliRunner().invoke(app, ["eval", "voc", "--checkpoint", str(checkpoint), "--data", str(world / "voc"),
                                      "--output", str(tmp_path / "e"), "--device", "cpu"])
    assert result.exit_code == 2 and "ovseg eval synthetic" in result.output and "Traceback" not in result.output
