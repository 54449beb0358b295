"""Make COCO-Object masks: the 80 COCO thing classes as ids 1-80 on background 0.

Two sources:
- COCO-Stuff 164k's `stuffthingmaps` PNGs (`--stuffthingmaps`), GroupViT's own route
  (convert_dataset/convert_coco_object.py, used by OVSegmentor): stored value v is COCO category
  v + 1; things become their contiguous id 1-80, and stuff and 'unlabeled' (255) become
  background 0. This gives GroupViT's masks exactly.
- COCO's instance annotations (`--annotations instances_val2017.json`), when COCO-Stuff is not at
  hand: the instance masks are painted with their contiguous class id on background 0, crowd
  regions included with their class, in reverse annotation order so that the first annotation of
  an image ends on top (how COCO-Stuff's own tool turned COCO's instances into a thing map).
  Polygons are rasterised by pycocotools, so edge pixels may differ from COCO-Stuff's maps;
  docs/evaluation.md says more. Needs pycocotools (`pip install pycocotools`).

Output: `OUT/coco_stuff164k/annotations/val2017/<image id>_instanceTrainIds.png` plus a symlink
`OUT/coco_stuff164k/images/val2017` to the images.

    python -m ovseg.evaluation.coco_convert --stuffthingmaps stuffthingmaps_trainval2017/val2017 \\
        --images val2017/ --output /data
    python -m ovseg.evaluation.coco_convert --annotations instances_val2017.json \\
        --images val2017/ --output /data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# COCO's 80 thing category ids (1-90 with ten ids unused); their order gives ids 1-80
MISSING_THING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
THING_IDS = tuple(i for i in range(1, 91) if i not in MISSING_THING_IDS)
CONTIGUOUS = {category: i + 1 for i, category in enumerate(THING_IDS)}


def stuffthing_lookup() -> np.ndarray:
    """(256,) uint8 table from a stuffthingmaps value (COCO category - 1, 255 unlabeled) to the
    COCO-Object id: things 1-80, everything else 0."""
    table = np.zeros(256, dtype=np.uint8)
    for category, index in CONTIGUOUS.items():
        table[category - 1] = index
    return table


def _output_dirs(images: Path, output: Path, split: str) -> Path:
    root = Path(output) / "coco_stuff164k"
    out_dir = root / "annotations" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    link = root / "images" / split
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(images).resolve(), target_is_directory=True)
    return out_dir


def _save(label: np.ndarray, out_dir: Path, stem: str) -> None:
    tmp = out_dir / f".{stem}.png"
    Image.fromarray(label).save(tmp, format="PNG")
    tmp.replace(out_dir / f"{stem}_instanceTrainIds.png")


def convert_stuffthingmaps(maps: Path, images: Path, output: Path, split: str = "val2017") -> int:
    """GroupViT's conversion of COCO-Stuff's `stuffthingmaps` PNGs; returns the masks written."""
    out_dir = _output_dirs(images, output, split)
    table = stuffthing_lookup()
    paths = sorted(p for p in Path(maps).glob("*.png") if "TrainIds" not in p.name)
    if not paths:
        raise FileNotFoundError(f"no stuffthingmaps PNGs in {maps}")
    for path in tqdm(paths, desc="coco-object masks", unit="img"):
        _save(table[np.asarray(Image.open(path), dtype=np.uint8)], out_dir, path.stem)
    return len(paths)


def convert(annotations: Path, images: Path, output: Path, split: str = "val2017") -> int:
    """Masks from COCO instance annotations, one per image; returns the masks written."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit("coco_convert needs pycocotools: pip install pycocotools") from error
    payload = json.loads(Path(annotations).read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in payload["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out_dir = _output_dirs(images, output, split)
    written = 0
    for info in tqdm(payload["images"], desc="coco-object masks", unit="img"):
        h, w = info["height"], info["width"]
        label = np.zeros((h, w), dtype=np.uint8)
        for ann in reversed(by_image.get(info["id"], [])):  # the first annotation ends on top
            segm = ann["segmentation"]
            if isinstance(segm, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            elif isinstance(segm.get("counts"), list):
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                rle = segm
            label[mask_utils.decode(rle).astype(bool)] = CONTIGUOUS[ann["category_id"]]
        _save(label, out_dir, Path(info["file_name"]).stem)
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stuffthingmaps", type=Path, help="folder of COCO-Stuff stuffthingmaps PNGs (val2017)")
    source.add_argument("--annotations", type=Path, help="instances_val2017.json")
    parser.add_argument("--images", type=Path, required=True, help="folder of val2017 images")
    parser.add_argument("--output", type=Path, required=True, help="folder to hold coco_stuff164k/")
    args = parser.parse_args()
    if args.stuffthingmaps is not None:
        written = convert_stuffthingmaps(args.stuffthingmaps, args.images, args.output)
    else:
        written = convert(args.annotations, args.images, args.output)
    print(f"wrote {written} masks")


if __name__ == "__main__":
    main()
