"""Make COCO-Object masks from COCO instance annotations (the GroupViT conversion).

Every image's instance masks are painted, largest first so small objects stay on top, with the
contiguous class id 1-80 of their category on background 0; crowd regions become 255 (ignored).
Output: `OUT/coco_stuff164k/annotations/val2017/<image id>_instanceTrainIds.png` plus a symlink
`OUT/coco_stuff164k/images/val2017` to the images. Needs pycocotools (`pip install pycocotools`).

    python -m ovseg.evaluation.coco_convert --annotations instances_val2017.json \
        --images val2017/ --output /data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ovseg.evaluation.metrics import IGNORE_INDEX


def convert(annotations: Path, images: Path, output: Path, split: str = "val2017") -> int:
    """Write one mask per annotated image; returns the number of masks written."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit("coco_convert needs pycocotools: pip install pycocotools") from error
    payload = json.loads(Path(annotations).read_text())
    categories = sorted(c["id"] for c in payload["categories"])
    contiguous = {cat_id: i + 1 for i, cat_id in enumerate(categories)}
    by_image: dict[int, list[dict]] = {}
    for ann in payload["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    root = Path(output) / "coco_stuff164k"
    out_dir = root / "annotations" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    link = root / "images" / split
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(images).resolve(), target_is_directory=True)
    written = 0
    for info in tqdm(payload["images"], desc="coco-object masks", unit="img"):
        h, w = info["height"], info["width"]
        label = np.zeros((h, w), dtype=np.uint8)
        for ann in sorted(by_image.get(info["id"], []), key=lambda a: -a.get("area", 0)):
            segm = ann["segmentation"]
            if isinstance(segm, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            elif isinstance(segm.get("counts"), list):
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                rle = segm
            mask = mask_utils.decode(rle).astype(bool)
            label[mask] = IGNORE_INDEX if ann.get("iscrowd") else contiguous[ann["category_id"]]
        stem = Path(info["file_name"]).stem
        tmp = out_dir / f".{stem}.png"
        Image.fromarray(label).save(tmp, format="PNG")
        tmp.replace(out_dir / f"{stem}_instanceTrainIds.png")
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", type=Path, required=True, help="instances_val2017.json")
    parser.add_argument("--images", type=Path, required=True, help="folder of val2017 images")
    parser.add_argument("--output", type=Path, required=True, help="folder to hold coco_stuff164k/")
    args = parser.parse_args()
    print(f"wrote {convert(args.annotations, args.images, args.output)} masks")


if __name__ == "__main__":
    main()
