"""The synthetic captioned-shapes world: the embedded default data set (docs/synthetic.md).

Every image holds one to three shapes of named categories and colours on a textured background;
its caption names some of them in varied English, the way web alt-text varies. The training
images and their captions are served over loopback HTTP and go through the real pipeline
(ingest, spaCy parse, select, img2dataset download); the validation and test images are drawn
apart, with their masks, in the VOC layout that `ovseg eval synthetic` reads.

Each image is drawn from its own random stream, keyed by (seed, split, index), so an image does
not depend on how many others were drawn, and the same seed always gives the same world.

    OUT/images/000000.jpg ...         training images (served; never with masks)
    OUT/scenes.parquet                one row per training image: file, caption, objects drawn
    OUT/captions.tsv                  url<TAB>caption, no header (CC12M's form), see write_captions_tsv
    OUT/voc/JPEGImages/*.jpg          val and test images
    OUT/voc/SegmentationClass/*.png   palette PNGs: class index per pixel, 255 on object borders
    OUT/voc/ImageSets/Segmentation/{val,test}.txt
    OUT/voc/classes.json              {"classes": ["background", ...], "palette": [[r, g, b], ...]}
    OUT/world.json                    the generator's settings and counts (written last: completion marker)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# The vocabulary of the world
# ---------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross",
    "ring", "diamond", "hexagon", "crescent", "pentagon", "arrow",
)
PLURALS = {"cross": "crosses"}  # every other shape takes an -s

# Named colours (RGB). Every shape takes every colour, so colour never gives the class away.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (130, 40, 170), "pink": (245, 120, 190), "white": (245, 245, 245),
    "black": (20, 20, 20), "brown": (120, 70, 30), "grey": (128, 128, 128), "cyan": (40, 210, 220),
}
BACKGROUNDS = ("noise", "stripes", "gradient", "checks", "plain")
BACKGROUND_WORDS = {"noise": ("noisy", "grainy", "speckled"), "stripes": ("striped",),
                    "gradient": ("gradient", "fading"), "checks": ("checkered", "checked"),
                    "plain": ("plain", "simple")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

SPLITS = {"train": 0, "val": 1, "test": 2}  # part of each image's random-stream key

# "standard": flat-coloured shapes on a muted textured background (colour draws the masks);
# "textured": shapes, background and unnamed distractor shapes all filled from the same texture
# families and the same palette, several colours each, so neither colour nor local texture
# separates an object from what lies around it: only its outline does.
STYLES = ("standard", "textured")
TEXTURES = ("stripes", "checks", "noise", "gradient")  # the textured style's families
PALETTE_SIZE = 4  # textured style: colours of one scene, shared by its background and every shape


@dataclass
class WorldConfig:
    """Settings of `generate` (saved in OUT/world.json)."""

    n_train: int = 5000
    n_val: int = 200
    n_test: int = 500
    image_size: int = 64
    seed: int = 0
    max_objects: int = 3
    min_radius: float = 0.13      # object radius as a fraction of the image side
    max_radius: float = 0.30
    min_visible: float = 0.5      # an object must keep this fraction of its area after occlusion
    omit_probability: float = 0.2  # a caption leaves one object out (scenes with 2+ objects)
    jpeg_quality: int = 92
    shapes: tuple[str, ...] = SHAPES
    style: str = "standard"       # one of STYLES
    max_distractors: int = 3      # textured style: up to this many unnamed shapes (background class)

    def validate(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) < 0:
            raise ValueError("image counts must not be negative")
        if self.image_size < 16:
            raise ValueError("image size must be at least 16 pixels")
        if not 1 <= self.max_objects <= 5:
            raise ValueError("max_objects must be between 1 and 5")
        if not 0 < self.min_radius <= self.max_radius < 0.5:
            raise ValueError("radii must satisfy 0 < min_radius <= max_radius < 0.5")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, not {self.style!r}")
        if self.max_distractors < 0:
            raise ValueError("max_distractors must not be negative")
        unknown = set(self.shapes) - set(SHAPES)
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {', '.join(SHAPES)} (unknown: {sorted(unknown)})")


@dataclass
class ShapeObject:
    """One drawn object: its category, colour name and pose in pixels."""

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float  # degrees
    rgb: tuple[int, int, int] = (0, 0, 0)
    mentioned: bool = True
    texture: Optional["Texture"] = None  # textured style: the fill (`rgb` is its first colour)


@dataclass
class Texture:
    """A fill of the textured style: a family of TEXTURES, two or three colours, its pattern."""

    kind: str
    colours: list[str]
    rgbs: list[tuple[int, int, int]]
    params: dict


@dataclass
class Distractor:
    """An unnamed shape of the textured style (a lumpy blob or a thick curved stroke): drawn
    under the named objects and labelled background."""

    kind: str
    points: list[tuple[float, float]]
    width: int  # stroke width in pixels (0 for a blob: the points are its outline)
    texture: Texture


@dataclass
class Scene:
    """One image's content: the background and objects in drawing order (last on top)."""

    size: int
    background: str
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_params: dict
    objects: list[ShapeObject] = field(default_factory=list)
    caption: str = ""
    style: str = "standard"
    texture: Optional[Texture] = None  # textured style: the background's fill
    distractors: list[Distractor] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(n: int = 48) -> list[tuple[float, float]]:
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17.0, (y + 2.5) / 17.0))
    return pts


# Unit outlines (radius about 1, centred at 0). Rings and crescents are an outer outline with a
# hole cut out: (outer, hole or None).
_OUTLINES: dict[str, tuple[list[tuple[float, float]], Optional[list[tuple[float, float]]]]] = {
    "circle": (_regular(48), None),
    "square": ([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], None),
    "triangle": (_regular(3, 1.0), None),
    "star": (_star(), None),
    "heart": (_heart(), None),
    "cross": ([(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3),
               (0.3, 0.95), (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3)], None),
    "ring": (_regular(48), _regular(48, 0.55)),
    "diamond": ([(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)], None),
    "hexagon": (_regular(6, 0.95, 0.0), None),
    "crescent": (_regular(48), [(x + 0.45, y - 0.15) for x, y in _regular(48, 0.85)]),
    "pentagon": (_regular(5, 0.95), None),
    "arrow": ([(-0.95, -0.25), (0.2, -0.25), (0.2, -0.6), (0.95, 0.0), (0.2, 0.6), (0.2, 0.25), (-0.95, 0.25)], None),
}


def _place(points: list[tuple[float, float]], obj: ShapeObject) -> list[tuple[float, float]]:
    a = math.radians(obj.angle)
    c, s = math.cos(a), math.sin(a)
    return [(obj.cx + obj.radius * (c * x - s * y), obj.cy + obj.radius * (s * x + c * y)) for x, y in points]


def object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """The pixels one object covers when drawn alone: (size, size) bool."""
    outer, hole = _OUTLINES[obj.shape]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(_place(outer, obj), fill=255)
    if hole is not None:
        draw.polygon(_place(hole, obj), fill=0)
    return np.asarray(canvas) > 0


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.size
    c0, c1 = (np.array(c, dtype=np.float32) for c in scene.background_colours)
    p = scene.background_params
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if scene.background == "plain":
        weight = np.zeros((size, size), np.float32)
    elif scene.background == "gradient":
        weight = np.clip((np.cos(p["angle"]) * xx + np.sin(p["angle"]) * yy + 1) / 2, 0, 1)
        weight = (weight - weight.min()) / max(float(weight.max() - weight.min()), 1e-6)
    elif scene.background == "stripes":
        proj = np.cos(p["angle"]) * xx + np.sin(p["angle"]) * yy
        weight = (np.floor(proj * size / p["period"]) % 2).astype(np.float32)
    elif scene.background == "checks":
        weight = ((np.floor(xx * size / p["period"]) + np.floor(yy * size / p["period"])) % 2).astype(np.float32)
    else:  # noise: smooth blobs from an upsampled coarse grid
        grid = Image.fromarray((rng.random((p["cells"], p["cells"])) * 255).astype(np.uint8))
        weight = np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    image = c0[None, None, :] * (1 - weight[..., None]) + c1[None, None, :] * weight[..., None]
    image += rng.normal(0, p["grain"], size=image.shape).astype(np.float32)  # fine grain on every texture
    return image


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene: the (H, W, 3) uint8 image and the (H, W) uint8 depth map (0 = background,
    i + 1 = object i in drawing order, the visible top-most object at each pixel)."""
    size = scene.size
    if scene.style == "textured":
        return _render_textured(scene, rng)
    image = _background(scene, rng)
    depth = np.zeros((size, size), np.uint8)
    for i, obj in enumerate(scene.objects):
        mask = object_mask(obj, size)
        shade = 1.0 + rng.normal(0, 0.04)  # slight per-object brightness jitter
        image[mask] = np.clip(np.array(obj.rgb, np.float32) * shade, 0, 255)
        depth[mask] = i + 1
    return np.clip(image, 0, 255).astype(np.uint8), depth


def _fill(texture: Texture, size: int, rng: np.random.Generator) -> np.ndarray:
    """The (size, size, 3) float image of a texture over the whole canvas (the caller masks it)."""
    rgbs = np.array(texture.rgbs, np.float32)  # (k, 3)
    k, p = len(rgbs), texture.params
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture.kind == "stripes":
        proj = np.cos(p["angle"]) * xx + np.sin(p["angle"]) * yy + p["phase"] * p["period"]
        return rgbs[(np.floor(proj / p["period"]) % k).astype(int)]
    if texture.kind == "checks":
        u = np.cos(p["angle"]) * xx + np.sin(p["angle"]) * yy
        v = -np.sin(p["angle"]) * xx + np.cos(p["angle"]) * yy
        cell = np.floor(u / p["period"] + p["phase"]) + np.floor(v / p["period"] + p["phase"])
        return rgbs[(cell % k).astype(int)]
    if texture.kind == "noise":  # smooth blobs cut into k colour bands (camouflage)
        grid = Image.fromarray((rng.random((p["cells"], p["cells"])) * 255).astype(np.uint8))
        weight = np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        weight = (weight - weight.min()) / max(float(weight.max() - weight.min()), 1e-6)
        return rgbs[np.minimum((weight * k).astype(int), k - 1)]
    # gradient: a linear ramp through the k colours along a random direction, across the
    # canvas, or across the object's own extent (centre and radius in `params`)
    cx, cy, span = p.get("cx", size / 2), p.get("cy", size / 2), p.get("span", size / math.sqrt(2))
    t = (np.cos(p["angle"]) * (xx - cx) + np.sin(p["angle"]) * (yy - cy)) / (2 * span) + 0.5
    t = np.clip(t, 0, 1) * (k - 1)
    low = np.minimum(np.floor(t).astype(int), k - 2)
    frac = (t - low)[..., None]
    return rgbs[low] * (1 - frac) + rgbs[low + 1] * frac


def distractor_mask(distractor: Distractor, size: int) -> np.ndarray:
    """The pixels an unnamed distractor shape covers: (size, size) bool."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if distractor.width:
        draw.line(distractor.points, fill=255, width=distractor.width, joint="curve")
    else:
        draw.polygon(distractor.points, fill=255)
    return np.asarray(canvas) > 0


def _render_textured(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    image = _fill(scene.texture, size, rng)
    for distractor in scene.distractors:  # under the named objects
        mask = distractor_mask(distractor, size)
        image[mask] = _fill(distractor.texture, size, rng)[mask]
    depth = np.zeros((size, size), np.uint8)
    for i, obj in enumerate(scene.objects):
        mask = object_mask(obj, size)
        image[mask] = _fill(obj.texture, size, rng)[mask]
        depth[mask] = i + 1
    image = image + rng.normal(0, scene.background_params["grain"], size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), depth


def label_map(scene: Scene, depth: np.ndarray, classes: list[str], border: bool = True) -> np.ndarray:
    """Class index per pixel (0 = background) from the depth map; with `border`, 255 on the ring
    of pixels just outside each visible object outline (VOC's void border, in the spirit of its
    hand-drawn outlines): a pixel whose 4-neighbour lies on an object drawn above it."""
    lut = np.zeros(len(scene.objects) + 1, np.uint8)
    for i, obj in enumerate(scene.objects):
        lut[i + 1] = classes.index(obj.shape)
    labels = lut[depth]
    if border:
        padded = np.pad(depth, 1, mode="edge")
        above = np.zeros_like(depth, dtype=bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            neighbour = padded[dy:dy + depth.shape[0], dx:dx + depth.shape[1]]
            above |= neighbour > depth
        labels = labels.copy()
        labels[above] = 255
    return labels


# ---------------------------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------------------------


def _colour_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))


def _random_background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # Muted colours, away from the saturated object palette.
    base = rng.uniform(60, 200)
    return tuple(int(np.clip(base + rng.normal(0, 35), 0, 255)) for _ in range(3))


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Draw the content of one image (background, objects, caption) from `rng`."""
    if cfg.style == "textured":
        return _sample_textured_scene(rng, cfg)
    size = cfg.image_size
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colours = (_random_background_colour(rng), _random_background_colour(rng))
    params = {"angle": float(rng.uniform(0, math.pi)), "period": float(rng.uniform(0.06, 0.18) * size),
              "cells": int(rng.integers(3, 8)), "grain": float(rng.uniform(2, 10))}
    scene = Scene(size, kind, colours, params)
    _place_objects(scene, rng, cfg, lambda: _sample_object(rng, cfg, colours))
    scene.caption = make_caption(scene, rng, cfg)
    return scene


def _place_objects(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, sample) -> None:
    """Add one to max_objects objects from `sample()` to `scene`, each one that would hide too
    much of one already placed drawn again."""
    size = cfg.image_size
    n_objects = int(rng.choice(np.arange(1, cfg.max_objects + 1), p=_object_count_probs(cfg.max_objects)))
    depth = np.zeros((size, size), np.uint8)
    areas: list[int] = []
    for _ in range(n_objects):
        for _attempt in range(20):
            obj = sample()
            mask = object_mask(obj, size)
            # Would this object (on top) hide too much of one already placed?
            trial = depth.copy()
            trial[mask] = len(scene.objects) + 1
            visible = [int((trial == i + 1).sum()) for i in range(len(scene.objects))]
            if mask.sum() >= 0.5 * np.pi * (obj.radius * 0.6) ** 2 and all(
                v >= cfg.min_visible * a for v, a in zip(visible, areas)
            ):
                scene.objects.append(obj)
                areas.append(int(mask.sum()))
                depth = trial
                break
    if not scene.objects:  # every attempt failed (tiny images): one centred object
        obj = sample()
        obj.cx = obj.cy = size / 2
        scene.objects.append(obj)


def _sample_texture(rng: np.random.Generator, size: int, names: list[str],
                    avoid: Optional[Texture] = None) -> Texture:
    """A fill of the textured style from the scene's palette `names`: the same families, palette
    and pattern sizes for the background, the objects and the distractors. Not of `avoid`'s
    family, so an object's outline shows against the background."""
    kinds = [k for k in TEXTURES if avoid is None or k != avoid.kind]
    kind = kinds[rng.integers(len(kinds))]
    colours = [names[i] for i in rng.choice(len(names), size=int(rng.integers(2, 4)), replace=False)]
    rgbs = [tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in COLOURS[c]) for c in colours]
    params = {"angle": float(rng.uniform(0, math.pi)), "period": float(rng.uniform(0.06, 0.14) * size),
              "phase": float(rng.uniform(0, 1)), "cells": int(rng.integers(3, 8))}
    return Texture(kind, colours, rgbs, params)


def _sample_distractor(rng: np.random.Generator, cfg: WorldConfig, names: list[str]) -> Distractor:
    """A lumpy blob (a circle whose radius wobbles with random low harmonics) or a thick curved
    stroke, of the named objects' sizes: clutter no caption names."""
    size = cfg.image_size
    radius = float(rng.uniform(cfg.min_radius, cfg.max_radius) * size)
    cx, cy = (float(rng.uniform(0, size)) for _ in range(2))
    if rng.random() < 0.5:
        amps, phases = rng.uniform(0.12, 0.3, 3), rng.uniform(0, 2 * math.pi, 3)
        points = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            r = radius * (1 + sum(a * math.sin((h + 2) * t + f) for h, (a, f) in enumerate(zip(amps, phases))))
            points.append((cx + r * math.cos(t), cy + r * math.sin(t)))
        return Distractor("blob", points, 0, _sample_texture(rng, size, names))
    a = rng.uniform(0, 2 * math.pi)
    ends = [(cx - 1.2 * radius * math.cos(a), cy - 1.2 * radius * math.sin(a)),
            (cx + 1.2 * radius * math.cos(a), cy + 1.2 * radius * math.sin(a))]
    bend = (cx + rng.normal(0, radius), cy + rng.normal(0, radius))
    points = [((1 - t) ** 2 * ends[0][0] + 2 * t * (1 - t) * bend[0] + t ** 2 * ends[1][0],
               (1 - t) ** 2 * ends[0][1] + 2 * t * (1 - t) * bend[1] + t ** 2 * ends[1][1]) for t in np.linspace(0, 1, 12)]
    width = max(2, int(round(rng.uniform(0.25, 0.45) * radius)))
    return Distractor("stroke", points, width, _sample_texture(rng, size, names))


def _sample_textured_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    size = cfg.image_size
    # one palette per scene, which every fill draws its colours from: colour tells nothing of
    # where an object ends
    names = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=PALETTE_SIZE, replace=False)]
    background = _sample_texture(rng, size, names)
    colours = (background.rgbs[0], background.rgbs[1])
    scene = Scene(size, background.kind, colours, {"grain": float(rng.uniform(2, 8))}, style="textured",
                  texture=background)
    scene.distractors = [_sample_distractor(rng, cfg, names) for _ in range(int(rng.integers(0, cfg.max_distractors + 1)))]

    def sample() -> ShapeObject:
        shape = cfg.shapes[rng.integers(len(cfg.shapes))]
        radius = float(rng.uniform(cfg.min_radius, cfg.max_radius) * size)
        margin = radius * 0.6
        cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
        texture = _sample_texture(rng, size, names, avoid=background)
        texture.params.update(cx=cx, cy=cy, span=radius)  # a gradient ramps across the object itself
        return ShapeObject(shape, texture.colours[0], cx, cy, radius, float(rng.uniform(0, 360)), texture.rgbs[0],
                           texture=texture)

    _place_objects(scene, rng, cfg, sample)
    scene.caption = make_caption(scene, rng, cfg)
    return scene


def _object_count_probs(max_objects: int) -> np.ndarray:
    p = np.array([0.4, 0.35, 0.25, 0.1, 0.1][:max_objects], np.float64)
    return p / p.sum()


def _sample_object(rng: np.random.Generator, cfg: WorldConfig, background) -> ShapeObject:
    size = cfg.image_size
    shape = cfg.shapes[rng.integers(len(cfg.shapes))]
    names = [c for c in COLOURS if min(_colour_distance(COLOURS[c], b) for b in background) > 90]
    colour = names[rng.integers(len(names))] if names else list(COLOURS)[rng.integers(len(COLOURS))]
    radius = float(rng.uniform(cfg.min_radius, cfg.max_radius) * size)
    margin = radius * 0.6
    cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
    rgb = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in COLOURS[colour])
    return ShapeObject(shape, colour, cx, cy, radius, float(rng.uniform(0, 360)), rgb)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("big", "large", "huge")}
_STYLE_WORDS = ("bright", "shiny", "flat", "simple", "bold", "cute", "glossy")
# Distractor nouns (photo, backdrop, paper, art, ...) are each rarer than any shape, as generic
# words are rarer than a data set's objects, so a frequency-ranked vocabulary starts with shapes.
_PREFIXES = ("a photo of {}", "an illustration of {}", "a sketch of {}", "a drawing of {}",
             "a cartoon of {}", "a snapshot of {}") + ("{}",) * 8
_SUFFIXES = (" on a {bg} background", " against a {bg} backdrop", " on {bg} paper") + ("",) * 14
_TAILS = ("",) * 8 + (".",) * 5 + (" in the picture", ", vector art", ", stock image")


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _phrase(objs: list[ShapeObject], rng: np.random.Generator, cfg: WorldConfig, lead: bool) -> str:
    """A noun phrase naming one or more objects of the same shape."""
    shape = objs[0].shape
    same_colour = len({o.colour for o in objs}) == 1
    words: list[str] = []
    if len(objs) == 1:
        obj = objs[0]
        r = obj.radius / cfg.image_size
        if r < cfg.min_radius + 0.04 and rng.random() < 0.4:
            words.append(str(rng.choice(_SIZE_WORDS["small"])))
        elif r > cfg.max_radius - 0.05 and rng.random() < 0.4:
            words.append(str(rng.choice(_SIZE_WORDS["large"])))
        elif rng.random() < 0.15:
            words.append(str(rng.choice(_STYLE_WORDS)))
        if rng.random() < 0.75:
            words.append(obj.colour)
        words.append(shape)
        det = str(rng.choice(["a", "a", "a", "the"]))
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
    else:
        if same_colour and rng.random() < 0.7:
            words.append(objs[0].colour)
        words.append(plural(shape))
        det = NUMBER_WORDS[len(objs)] if rng.random() < 0.8 else str(rng.choice(["some", "", "several"]))
    return " ".join(w for w in [det, *words] if w)


def _spatial(a: ShapeObject, b: ShapeObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    conj = str(rng.choice(["and", "and", "with", "next to", "beside"])) if len(parts) == 2 else "and"
    return ", ".join(parts[:-1]) + f" {conj} " + parts[-1]


def make_caption(scene: Scene, rng: np.random.Generator, cfg: WorldConfig) -> str:
    """A caption naming the scene's objects (maybe not all) in varied English; marks
    `ShapeObject.mentioned`."""
    objs = list(scene.objects)
    for o in objs:
        o.mentioned = True
    if len(objs) > 1 and rng.random() < cfg.omit_probability:
        objs[int(rng.integers(len(objs)))].mentioned = False
    shown = [o for o in objs if o.mentioned]
    groups: dict[str, list[ShapeObject]] = {}
    for o in shown:
        groups.setdefault(o.shape, []).append(o)
    order = list(groups)
    rng.shuffle(order)
    if len(order) == 2 and all(len(groups[s]) == 1 for s in order) and rng.random() < 0.3:
        a, b = groups[order[0]][0], groups[order[1]][0]
        body = f"{_phrase([a], rng, cfg, True)} {_spatial(a, b)} {_phrase([b], rng, cfg, False)}"
    else:
        body = _join([_phrase(groups[s], rng, cfg, i == 0) for i, s in enumerate(order)], rng)
    caption = str(rng.choice(_PREFIXES)).format(body)
    bg = str(rng.choice(BACKGROUND_WORDS[scene.background]))
    caption += str(rng.choice(_SUFFIXES)).format(bg=bg) + str(rng.choice(_TAILS))
    if rng.random() < 0.5:
        caption = caption[0].upper() + caption[1:]
    return caption


# ---------------------------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------------------------


def classes(cfg: WorldConfig = WorldConfig()) -> list[str]:
    return ["background", *cfg.shapes]


def palette(n: int) -> list[list[int]]:
    """VOC's colour map (bit-interleaved), one colour per class index."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image, independent of every other image's."""
    return np.random.default_rng([seed, SPLITS[split], index])


def make_sample(cfg: WorldConfig, split: str, index: int) -> tuple[Scene, np.ndarray, np.ndarray]:
    """Scene, image and depth map of image `index` of `split`."""
    rng = scene_rng(cfg.seed, split, index)
    scene = sample_scene(rng, cfg)
    image, depth = render(scene, rng)
    return scene, image, depth


def image_name(split: str, index: int) -> str:
    return f"{index:06d}" if split == "train" else f"{split}_{index:05d}"


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=total < 500)


def generate(out: str | os.PathLike, cfg: WorldConfig = WorldConfig(), force: bool = False,
             base_url: Optional[str] = None) -> Path:
    """Write the synthetic world into `out` (layout in the module docstring). Skipped when
    `out/world.json` exists with the same settings, unless `force`. With `base_url`, also writes
    `captions.tsv` for that URL (see `write_captions_tsv`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg.validate()
    out = Path(out)
    marker = out / "world.json"
    settings = _settings(cfg)
    if marker.exists() and not force and _held_settings(marker) == settings:
        if base_url is not None:
            write_captions_tsv(out, base_url)
        return out
    if force or marker.exists():
        for sub in ("images", "voc"):
            shutil.rmtree(out / sub, ignore_errors=True)
        marker.unlink(missing_ok=True)
        (out / "captions.tsv").unlink(missing_ok=True)  # it named the old images
    names = classes(cfg)
    tmp_images = out / "images.partial"
    shutil.rmtree(tmp_images, ignore_errors=True)
    tmp_images.mkdir(parents=True)
    rows: dict[str, list] = {"index": [], "file": [], "caption": [], "objects": []}
    with _progress(cfg.n_train, "synthetic train") as bar:
        for i in range(cfg.n_train):
            scene, image, _ = make_sample(cfg, "train", i)
            name = image_name("train", i) + ".jpg"
            Image.fromarray(image).save(tmp_images / name, quality=cfg.jpeg_quality, subsampling=0)
            rows["index"].append(i)
            rows["file"].append(f"images/{name}")
            rows["caption"].append(scene.caption)
            rows["objects"].append([_object_row(o) for o in scene.objects])
            bar.update()
    shutil.rmtree(out / "images", ignore_errors=True)
    tmp_images.rename(out / "images")
    _write_parquet(pa.table(rows), out / "scenes.parquet", pq)

    voc = out / "voc.partial"
    shutil.rmtree(voc, ignore_errors=True)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    pal = palette(len(names))
    flat_palette = [v for c in pal for v in c] + [0, 0, 0] * (256 - len(pal))
    flat_palette[255 * 3:255 * 3 + 3] = [224, 224, 192]  # VOC's colour for the void border
    for split, n in (("val", cfg.n_val), ("test", cfg.n_test)):
        ids = []
        with _progress(n, f"synthetic {split}") as bar:
            for i in range(n):
                scene, image, depth = make_sample(cfg, split, i)
                name = image_name(split, i)
                Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=cfg.jpeg_quality, subsampling=0)
                mask = Image.fromarray(label_map(scene, depth, names), mode="P")
                mask.putpalette(flat_palette)
                mask.save(voc / "SegmentationClass" / f"{name}.png")
                ids.append(name)
                bar.update()
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))
    (voc / "classes.json").write_text(json.dumps({"classes": names, "palette": pal}, indent=1))
    shutil.rmtree(out / "voc", ignore_errors=True)
    voc.rename(out / "voc")
    if base_url is not None:
        write_captions_tsv(out, base_url)
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": settings, "classes": names,
                               "counts": {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}}, indent=1))
    tmp.replace(marker)
    return out


def _settings(cfg: WorldConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["shapes"] = list(cfg.shapes)
    return d


def _object_row(o: ShapeObject) -> dict:
    return {"shape": o.shape, "colour": o.colour, "cx": o.cx, "cy": o.cy, "radius": o.radius,
            "angle": o.angle, "mentioned": o.mentioned}


def _write_parquet(table, path: Path, pq) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _held_settings(marker: Path) -> dict:
    """The settings in a world.json; one written before a setting existed holds its default
    (the standard style is what was drawn then)."""
    held = json.loads(marker.read_text()).get("config") or {}
    defaults = _settings(WorldConfig())
    return {**{k: defaults[k] for k in ("style", "max_distractors")}, **held}


def load_config(out: str | os.PathLike) -> WorldConfig:
    """The settings a world in `out` was generated with."""
    settings = _held_settings(Path(out) / "world.json")
    settings["shapes"] = tuple(settings["shapes"])
    return WorldConfig(**settings)


def captions(out: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(relative file, caption) of every training image of the world in `out`."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(out) / "scenes.parquet", columns=["file", "caption"])
    yield from zip(table["file"].to_pylist(), table["caption"].to_pylist())


def write_captions_tsv(out: str | os.PathLike, base_url: str, path: Optional[str | os.PathLike] = None) -> Path:
    """Write the training captions in CC12M's form (`url<TAB>caption`, no header) with URLs under
    `base_url`, which serves `out` (e.g. `serve(out).url`). Default path: `out/captions.tsv`."""
    out = Path(out)
    path = Path(path) if path is not None else out / "captions.tsv"
    base = base_url.rstrip("/")
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for file, caption in captions(out):
            f.write(f"{base}/{file}\t{caption}\n")
    tmp.replace(path)
    return path
