"""The synthetic captioned-shapes world: determinism, masks that match the drawing, class
coverage, captions that the real spaCy parse turns into the shape names, the VOC layout."""

import json
import re
import urllib.request
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ovseg.curation import synthetic as syn
from ovseg.curation.serve import serve

SMALL = syn.WorldConfig(n_train=40, n_val=12, n_test=12, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return syn.generate(tmp_path_factory.mktemp("world") / "out", SMALL)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_seed_writes_byte_identical_world_and_another_seed_differs(world, tmp_path):
    again = syn.generate(tmp_path / "again", SMALL)
    assert _files(world) == _files(again)
    for name in _files(world):
        if name == "scenes.parquet":  # parquet metadata may differ; compare its content
            continue
        assert (world / name).read_bytes() == (again / name).read_bytes(), name
    import pyarrow.parquet as pq

    assert pq.read_table(world / "scenes.parquet").equals(pq.read_table(again / "scenes.parquet"))
    other = syn.WorldConfig(**{**syn._settings(SMALL), "seed": 4, "shapes": SMALL.shapes})
    differs = [syn.make_sample(SMALL, "train", i)[0].caption != syn.make_sample(other, "train", i)[0].caption
               for i in range(10)]
    assert sum(differs) >= 8


def test_an_image_does_not_depend_on_how_many_images_are_drawn():
    big = syn.WorldConfig(n_train=10_000, seed=SMALL.seed)
    a, image_a, _ = syn.make_sample(SMALL, "train", 7)
    b, image_b, _ = syn.make_sample(big, "train", 7)
    assert a.caption == b.caption and np.array_equal(image_a, image_b)


def test_splits_are_drawn_from_separate_streams():
    train = {syn.make_sample(SMALL, "train", i)[0].caption for i in range(20)}
    test = [syn.make_sample(SMALL, "test", i)[0].caption for i in range(20)]
    assert sum(c in train for c in test) <= 2  # only chance collisions of short captions


def test_every_mask_pixel_matches_the_objects_redrawn_one_by_one(world):
    names = json.loads((world / "voc" / "classes.json").read_text())["classes"]
    for split in ("val", "test"):
        ids = (world / "voc" / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(ids) == 12
        for index, name in enumerate(ids):
            scene, drawn, _ = syn.make_sample(SMALL, split, index)
            saved = Image.open(world / "voc" / "SegmentationClass" / f"{name}.png")
            assert saved.mode == "P"
            labels = np.asarray(saved)
            # Paint each object alone, in drawing order: the top-most one owns the pixel.
            expected = np.zeros(labels.shape, np.uint8)
            owner = np.full(labels.shape, -1)
            for i, obj in enumerate(scene.objects):
                alone = syn.object_mask(obj, SMALL.image_size)
                expected[alone] = names.index(obj.shape)
                owner[alone] = i
            known = labels != 255
            assert np.array_equal(labels[known], expected[known]), name
            # 255 only on the ring just outside a visible object: background or a lower object.
            border = ~known
            assert border.sum() > 0
            padded = np.pad(owner, 1, constant_values=-1)
            neighbour_max = np.max([padded[1:-1, 2:], padded[1:-1, :-2], padded[2:, 1:-1], padded[:-2, 1:-1]], axis=0)
            assert np.all(neighbour_max[border] > owner[border])
            # The object's visible pixels carry its colour in the drawn image...
            for i, obj in enumerate(scene.objects):
                visible = (owner == i) & known
                if visible.sum() == 0:
                    continue
                mean = drawn[visible].astype(float).mean(axis=0)
                assert np.abs(mean - np.array(obj.rgb)).max() < 0.15 * 255 + 1, (name, obj)
            # ...and the JPEG on disk is that drawing.
            jpeg = np.asarray(Image.open(world / "voc" / "JPEGImages" / f"{name}.jpg").convert("RGB"), float)
            assert np.abs(jpeg - drawn).mean() < 10  # JPEG keeps the picture, not all of the grain


def test_every_class_appears_in_captions_and_in_test_masks(tmp_path):
    cfg = syn.WorldConfig(n_train=0, n_val=0, n_test=0, seed=5)
    named = Counter()
    for i in range(240):
        scene = syn.make_sample(cfg, "train", i)[0]
        named.update(o.shape for o in scene.objects if o.mentioned)
    assert set(named) == set(syn.SHAPES) and min(named.values()) >= 10
    seen = Counter()
    names = syn.classes(cfg)
    for i in range(120):
        scene, _, depth = syn.make_sample(cfg, "test", i)
        seen.update(names[v] for v in np.unique(syn.label_map(scene, depth, names)) if v not in (0, 255))
    assert set(seen) == set(syn.SHAPES)
    assert len(syn.SHAPES) >= 10


def test_colour_does_not_give_the_class_away():
    cfg = syn.WorldConfig(seed=11)
    colours = {shape: set() for shape in syn.SHAPES}
    for i in range(600):
        for obj in syn.make_sample(cfg, "train", i)[0].objects:
            colours[obj.shape].add(obj.colour)
    assert all(len(c) >= 6 for c in colours.values())


def test_captions_vary_like_alt_text_and_some_leave_an_object_out():
    cfg = syn.WorldConfig(seed=2)
    scenes = [syn.sample_scene(syn.scene_rng(2, "train", i), cfg) for i in range(400)]
    captions = [s.caption for s in scenes]
    assert len(set(captions)) > 360
    text = " ".join(captions).lower()
    assert re.search(r"\btwo \w*\s?(stars|crosses|circles|squares|hearts|rings|triangles)\b", text)
    for distractor in ("photo of", "background", "illustration of"):
        assert distractor in text
    omitted = [s for s in scenes if not all(o.mentioned for o in s.objects)]
    assert 0.05 * len(scenes) < len(omitted) < 0.3 * len(scenes)
    for scene in scenes:  # a caption names no shape that is not in the picture
        words = set(re.findall(r"[a-z]+", scene.caption.lower()))
        drawn = {o.shape for o in scene.objects}
        named = {s for s in syn.SHAPES if s in words or syn.plural(s) in words}
        assert named <= drawn, scene.caption
        assert {o.shape for o in scene.objects if o.mentioned} <= named, scene.caption


def _spacy_entities(captions):
    """Entities as the curation parse stage makes them (spaCy noun-chunk root lemmas)."""
    from ovseg.curation.parse import parse_captions

    return [set(e) for e in parse_captions(captions)]


def test_real_spacy_parse_turns_mentioned_shapes_into_entities():
    cfg = syn.WorldConfig(seed=9)
    scenes = [syn.sample_scene(syn.scene_rng(9, "train", i), cfg) for i in range(500)]
    entities = _spacy_entities([s.caption for s in scenes])
    found, missed = Counter(), Counter()
    for scene, ents in zip(scenes, entities):
        mentioned = {o.shape for o in scene.objects if o.mentioned}
        assert not (ents & set(syn.SHAPES)) - mentioned, scene.caption  # never a shape that is not named
        for shape in mentioned:
            (found if shape in ents else missed)[shape] += 1
    # Ranked by how many captions name them, the shapes come first: a top-K vocabulary is the shapes.
    frequency = Counter(e for ents in entities for e in ents)
    assert min(frequency[s] for s in syn.SHAPES) > max(n for e, n in frequency.items() if e not in syn.SHAPES)
    recall = sum(found.values()) / (sum(found.values()) + sum(missed.values()))
    assert recall >= 0.97, missed
    for shape in syn.SHAPES:  # "cross" and "square" are sometimes parsed as verbs or adjectives
        assert found[shape] / (found[shape] + missed[shape]) >= 0.85, (shape, found[shape], missed[shape])


def test_voc_split_loads_in_the_evaluation_reader(world):
    from ovseg.evaluation.datasets import load_synthetic

    data = load_synthetic(world, split="val")
    meta = json.loads((world / "voc" / "classes.json").read_text())
    assert meta["classes"] == ["background", *syn.SHAPES]
    assert len(meta["palette"]) == len(meta["classes"])
    assert data.prompt_classes == list(syn.SHAPES)
    image, label = data.load(0)
    assert np.asarray(image).shape[:2] == np.asarray(label).shape == (64, 64)


def test_training_images_have_no_masks_and_are_not_evaluation_images(world):
    train = {p.name for p in (world / "images").iterdir()}
    assert len(train) == SMALL.n_train and all(n.endswith(".jpg") for n in train)
    voc = {p.stem for p in (world / "voc" / "JPEGImages").iterdir()}
    assert not voc & {n[:-4] for n in train}
    assert not list(world.glob("images/*.png"))


def test_captions_tsv_points_at_images_the_loopback_server_serves(world, tmp_path):
    with serve(world) as server:
        tsv = syn.write_captions_tsv(world, server.url, tmp_path / "captions.tsv")
        rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        assert len(rows) == SMALL.n_train and all(len(r) == 2 for r in rows)
        assert rows[0][0].startswith(server.url + "/images/")
        for url, caption in rows[:3]:
            body = urllib.request.urlopen(url, timeout=5).read()
            assert body == (world / url[len(server.url) + 1:]).read_bytes()
            assert caption.strip()


def test_generate_skips_a_finished_world_and_force_redraws_it(tmp_path):
    cfg = syn.WorldConfig(n_train=3, n_val=2, n_test=2)
    out = syn.generate(tmp_path / "w", cfg)
    stamp = (out / "world.json").stat().st_mtime_ns
    (out / "images" / "000000.jpg").write_bytes(b"edited")
    syn.generate(out, cfg)
    assert (out / "images" / "000000.jpg").read_bytes() == b"edited"
    assert (out / "world.json").stat().st_mtime_ns == stamp
    syn.generate(out, cfg, force=True)
    assert (out / "images" / "000000.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG again
    assert syn.load_config(out) == cfg


def test_cli_draws_the_world_with_captions_for_the_base_url(tmp_path):
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["curate", "synthetic", str(out), "--train", "6", "--val", "2", "--test", "3",
                                      "--image-size", "48", "--base-url", "http://127.0.0.1:8123/"])
    assert result.exit_code == 0, result.output
    lines = (out / "captions.tsv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("http://127.0.0.1:8123/images/000000.jpg\t")
    assert len((out / "voc" / "ImageSets" / "Segmentation" / "test.txt").read_text().split()) == 3
    with Image.open(out / "images" / "000005.jpg") as image:
        assert image.size == (48, 48)
    for bad in (["--base-url", "ftp://host/x"], ["--image-size", "4"], ["--serve", "--base-url", "http://example.com"]):
        result = CliRunner().invoke(app, ["curate", "synthetic", str(tmp_path / "bad"), *bad])
        assert result.exit_code == 2 and "Traceback" not in result.output, (bad, result.output)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("bad", [{"image_size": 8}, {"max_objects": 0}, {"shapes": ("circle", "blob")},
                                 {"n_train": -1}, {"min_radius": 0.4, "max_radius": 0.3}, {"style": "fancy"},
                                 {"max_distractors": -1}])
def test_impossible_settings_are_refused_before_drawing(tmp_path, bad):
    with pytest.raises(ValueError):
        syn.generate(tmp_path / "w", syn.WorldConfig(**bad))
    assert not (tmp_path / "w").exists()


# --- the textured style -------------------------------------------------------------------------

TEXTURED = syn.WorldConfig(n_train=6, n_val=6, n_test=8, seed=3, style="textured")


def test_the_standard_style_is_the_default_and_an_old_world_json_reads_as_it(tmp_path):
    cfg = syn.WorldConfig(n_train=2, n_val=1, n_test=1)
    out = syn.generate(tmp_path / "w", cfg)
    marker = json.loads((out / "world.json").read_text())
    assert marker["config"]["style"] == "standard"
    del marker["config"]["style"], marker["config"]["max_distractors"]  # a world from before the styles
    (out / "world.json").write_text(json.dumps(marker))
    stamp = (out / "world.json").stat().st_mtime_ns
    assert syn.load_config(out) == cfg
    syn.generate(out, cfg)  # the same world: not redrawn
    assert (out / "world.json").stat().st_mtime_ns == stamp


def test_textured_masks_match_the_objects_and_distractors_are_background(tmp_path):
    out = syn.generate(tmp_path / "w", TEXTURED)
    assert syn.load_config(out).style == "textured"
    names = syn.classes(TEXTURED)
    distractors = 0
    for index in range(TEXTURED.n_test):
        scene, image, depth = syn.make_sample(TEXTURED, "test", index)
        labels = np.asarray(Image.open(out / "voc" / "SegmentationClass" / f"test_{index:05d}.png"))
        expected = np.zeros(labels.shape, np.uint8)
        for obj in scene.objects:
            expected[syn.object_mask(obj, TEXTURED.image_size)] = names.index(obj.shape)
        known = labels != 255
        assert np.array_equal(labels[known], expected[known])
        for d in scene.distractors:
            alone = syn.distractor_mask(d, TEXTURED.image_size) & (expected == 0) & known
            distractors += int(alone.sum())
            assert np.all(labels[alone] == 0)  # clutter no caption names is background
        assert scene.caption and all(o.texture is not None and len(o.texture.colours) >= 2 for o in scene.objects)
    assert distractors > 0


def _colour_separability(cfg, n=150) -> float:
    """Balanced accuracy of the best pixel classifier object-vs-background that reads only the
    pixel's colour (each cell of a 6x6x6 colour grid says its majority): 0.5 is no better than
    a coin."""
    counts = np.zeros((2, 6 ** 3))
    for i in range(n):
        scene, image, depth = syn.make_sample(cfg, "train", i)
        cell = (image.astype(int) * 6 // 256) @ np.array([36, 6, 1])
        for is_object in (0, 1):
            counts[is_object] += np.bincount(cell[(depth > 0) == is_object], minlength=6 ** 3)
    rates = counts / counts.sum(1, keepdims=True)
    says_object = rates[1] > rates[0]
    return 0.5 * (rates[1][says_object].sum() + rates[0][~says_object].sum())


def test_in_the_textured_world_colour_does_not_tell_an_object_from_the_background():
    standard = _colour_separability(syn.WorldConfig(seed=4))
    textured = _colour_separability(syn.WorldConfig(seed=4, style="textured"))
    assert standard > 0.85  # flat saturated shapes on muted backgrounds
    assert textured < 0.65


def test_objects_backgrounds_and_distractors_share_the_texture_families():
    cfg = syn.WorldConfig(seed=6, style="textured")
    kinds = {"object": Counter(), "background": Counter(), "distractor": Counter()}
    for i in range(300):
        scene = syn.make_sample(cfg, "train", i)[0]
        kinds["background"][scene.texture.kind] += 1
        kinds["object"].update(o.texture.kind for o in scene.objects)
        kinds["distractor"].update(d.texture.kind for d in scene.distractors)
        # an object never wears its own background's family: its outline must show
        assert all(o.texture.kind != scene.texture.kind for o in scene.objects)
    for counter in kinds.values():
        assert set(counter) == set(syn.TEXTURES)
        assert min(counter.values()) > 0.1 * sum(counter.values())


def test_cli_draws_the_textured_style_and_refuses_an_unknown_one(tmp_path):
    from typer.testing import CliRunner

    from ovseg.cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["curate", "synthetic", str(out), "--train", "2", "--val", "1", "--test", "1",
                                      "--style", "textured"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "world.json").read_text())["config"]["style"] == "textured"
    result = CliRunner().invoke(app, ["curate", "synthetic", str(tmp_path / "bad"), "--style", "fancy"])
    assert result.exit_code == 2 and "--style must be standard or textured" in result.output
    assert not (tmp_path / "bad").exists()
