"""Pictures of segmentations: colour label maps, overlays with a legend, and side-by-side panels
(image, ground truth, prediction, groups)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ovseg.evaluation.metrics import IGNORE_INDEX

GROUP_COLOURS = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
], dtype=np.uint8)


def load_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file of any mode PIL reads.

    16-bit and 32-bit greyscale (modes I;16*, I, F) are scaled to 8 bits by their bit depth, not
    clipped: PIL's own ``convert("RGB")`` turns every value above 255 white."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            values = np.asarray(image, dtype=np.float64)
            if image.mode == "F":
                top = max(float(np.nanmax(values)), 1.0) if values.size else 1.0
            else:
                top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2.0 ** 32 - 1
            grey = np.clip(np.nan_to_num(values) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def extend_palette(palette: list[list[int]], n: int) -> np.ndarray:
    """(max(n, len(palette)), 3) uint8: `palette`, then distinct colours for the ids beyond it."""
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if n <= len(colours):
        return colours
    extra = np.random.default_rng(0).integers(0, 256, size=(n - len(colours), 3), dtype=np.uint8)
    return np.concatenate([colours, extra])


def colourise(label: np.ndarray, palette: list[list[int]], ignore: int | None = IGNORE_INDEX) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) colours; the `ignore` label (None: no ignore label) is white."""
    top = int(label.max(initial=0)) + 1
    table = np.zeros((max(256, top), 3), dtype=np.uint8)
    colours = extend_palette(palette[:256] if ignore is not None else palette, top)
    table[: len(colours)] = colours[: len(table)]
    if ignore is not None:
        table[ignore] = 255
    return table[np.clip(label, 0, len(table) - 1)]


def palette_png(label: np.ndarray, palette: list[list[int]], path: Path) -> None:
    """Save a label map as a palette PNG (indices stay readable by any segmentation tool).

    A map with ids above 255 cannot be a palette PNG: it is saved as a 16-bit greyscale PNG of the
    ids instead (read back with ``np.asarray(Image.open(path))``)."""
    if label.size and int(label.max()) > 255:
        if int(label.max()) > 65535:
            raise ValueError("label ids above 65535 do not fit a PNG")
        Image.fromarray(label.astype(np.uint16)).save(path)
        return
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    image.putpalette(flat.reshape(-1).tolist())
    image.save(path)


def group_picture(groups: np.ndarray) -> np.ndarray:
    """(K, H, W) group scores -> (H, W, 3) colours of each pixel's arg-max group."""
    index = groups.argmax(axis=0)
    return GROUP_COLOURS[index % len(GROUP_COLOURS)]


def side_by_side(panels: list[np.ndarray], titles: list[str], scale: int = 1) -> Image.Image:
    """Panels of equal size in a row, each with a title above it."""
    h, w = panels[0].shape[:2]
    h, w = h * scale, w * scale
    title_h = 14
    canvas = Image.new("RGB", (len(panels) * (w + 4), h + title_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles)):
        image = Image.fromarray(panel).resize((w, h), Image.NEAREST)
        canvas.paste(image, (i * (w + 4), title_h))
        draw.text((i * (w + 4) + 2, 1), title, fill="black")
    return canvas


def overlay_with_legend(image: np.ndarray, label: np.ndarray, names: list[str],
                        palette: list[list[int]], alpha: float = 0.5,
                        ignore: int | None = IGNORE_INDEX) -> Image.Image:
    """The image with the colour label map blended on top and a legend of the classes present.

    With more names than 255, pass ``ignore=None`` (id 255 is then a class, not ignore)."""
    palette = extend_palette(palette, len(names)).tolist()
    colours = colourise(label, palette, ignore).astype(np.float32)
    blended = (image.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(label) if c != ignore and c < len(names)]
    row = 16
    h, w = blended.shape[:2]
    legend_w = max(120, 10 * max((len(names[c]) for c in present), default=4))
    canvas = Image.new("RGB", (w + legend_w, max(h, row * len(present) + 4)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, c in enumerate(present):
        y = 2 + i * row
        draw.rectangle([w + 4, y, w + 16, y + 12], fill=tuple(int(v) for v in palette[c]))
        draw.text((w + 20, y), names[c], fill="black")
    return canvas
