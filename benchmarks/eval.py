"""`ovseg bench eval`: how fast zero-shot evaluation runs.

The whole `ovseg eval` loop (JPEG and PNG decoding, resizing, sliding windows, the model, the
group-to-class scores, thresholding, the confusion matrix) is timed on a VOC-layout folder of
random images that the benchmark writes itself, with a randomly initialised model of each preset.
Speed does not depend on the weights, so no trained checkpoint or real data set is needed.

Settings per preset:
- the paper's protocol (short side 448, 448 windows, stride 224) on VOC-sized 500x375 images
  with VOC's 21 classes: two windows per image;
- the training-free methods' protocol (short side 336, 224 windows, stride 112; VOC20) on the
  same images: six windows per image;
- the synthetic world's protocol (64 px images, one window each, batched across images).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovseg.benchmarks.measure import Measure, machine
from ovseg.benchmarks.results import Section
from ovseg.evaluation import datasets as ds
from ovseg.evaluation.evaluate import evaluate_dataset, load_dataset
from ovseg.evaluation.segmenter import PROTOCOLS, Protocol, ZeroShotSegmenter, synthetic_protocol


def _random_model(preset: str, words: list[str]):
    from ovseg.training.model import build_model
    from ovseg.training.model.config import ModelConfig
    from ovseg.training.presets import get_preset
    from ovseg.training.tokenizer import train_wordpiece

    cfg = ModelConfig(**get_preset(preset)["model"])
    captions = [f"a photo of a {w}." for w in words] * 2
    tokenizer = train_wordpiece(captions, vocab_size=max(300, 4 * len(words)), min_frequency=1)
    torch.manual_seed(0)
    return build_model(cfg, tokenizer).eval()


def _write_voc(root: Path, n: int, height: int, width: int, n_classes: int) -> Path:
    """A VOC2012-layout folder of n random images with blocky random labels."""
    rng = np.random.default_rng(0)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = [v for rgb in ds.voc_palette() for v in rgb]
    ids = [f"bench_{i:04d}" for i in range(n)]
    for name in ids:
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        blocks = rng.integers(0, n_classes, (height // 25 + 1, width // 25 + 1), dtype=np.uint8)
        label = Image.fromarray(np.kron(blocks, np.ones((25, 25), dtype=np.uint8))[:height, :width], mode="P")
        label.putpalette(palette)
        label.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def measure(preset: str, protocol: Protocol, *, n_images: int, height: int, width: int,
            batch_size: int, device: str, workdir: Path) -> dict:
    """Images per second of the evaluation loop of one preset under one protocol."""
    folder = _write_voc(workdir / f"{preset}-{protocol.name}", n_images, height, width, len(ds.VOC_CLASSES))
    dataset = load_dataset("voc", folder, protocol=protocol.name)  # training-free: VOC20
    model = _random_model(preset, dataset.prompt_classes).to(device)
    segmenter = ZeroShotSegmenter(model, dataset.prompt_classes, with_background=dataset.has_background,
                                  bg_threshold=dataset.bg_threshold or 0.5, protocol=protocol, device=device,
                                  batch_size=batch_size)
    windows = len(segmenter._windows(*segmenter._prepare(dataset.load(0)[0]).shape[-2:]))
    evaluate_dataset(segmenter, dataset, limit=min(2, n_images), progress=False)  # warm-up, text cached
    with Measure(device) as m:
        evaluate_dataset(segmenter, dataset, progress=False)
    seconds = m.seconds
    return {"preset": preset, "protocol": protocol.name, "image": f"{width}x{height}",
            "short_side": protocol.short_side, "window": protocol.window, "stride": protocol.stride,
            "windows_per_image": windows, "images": n_images, "seconds": seconds,
            "images_per_s": n_images / seconds, "device": device, "batch_size": batch_size}


def benchmark_eval(presets: tuple[str, ...] = ("test", "synthetic-small"), *,
                   protocols: tuple[str, ...] = ("paper", "training-free"), n_images: int = 16,
                   synthetic_images: int = 128, batch_size: int = 16, device: str = "cpu",
                   threads: int | None = None, command: str = "ovseg bench eval") -> tuple[Section, list[dict]]:
    """The results section (`eval`, or `eval-cuda` on a GPU) and raw rows: evaluation images/s of each preset at each protocol (VOC-sized
    images) and at the synthetic world's (64 px)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rows = []
    n_threads = threads or previous
    try:
        with tempfile.TemporaryDirectory(prefix="ovseg-bench-eval-") as tmp:
            for preset in presets:
                for name in protocols:
                    rows.append(measure(preset, PROTOCOLS[name], n_images=n_images, height=375, width=500,
                                        batch_size=batch_size, device=device, workdir=Path(tmp)))
                rows.append(measure(preset, synthetic_protocol(64), n_images=synthetic_images, height=64, width=64,
                                    batch_size=batch_size, device=device, workdir=Path(tmp)))
    finally:
        torch.set_num_threads(previous)
    where = f"{n_threads} torch threads on the CPU"
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(device)} with bf16 autocast ({n_threads} CPU threads)"
    kind = device.split(":")[0]
    section = Section("eval" if kind == "cpu" else f"eval-{kind}",
                      "Evaluation speed (`ovseg bench eval`)" + ("" if kind == "cpu" else f" on {device}"), command,
                      machine=machine(device))
    section.machine["torch_threads"] = n_threads
    section.text("Evaluation speed: the whole `ovseg eval` loop (decode, resize, windows, model, scores, "
                 "confusion matrix) on random images with a randomly initialised model of each preset; "
                 f"{where}, batches of {batch_size} windows.")
    section.table(["preset", "protocol", "image", "short side", "window / stride", "windows per image",
                   ("images/s", None, ".2f"), ("s/image", None, ".3f")],
                  [[r["preset"], r["protocol"], r["image"], r["short_side"], f"{r['window']} / {r['stride']}",
                    r["windows_per_image"], r["images_per_s"], 1 / r["images_per_s"]] for r in rows])
    return section, rows
