"""Fixtures for training tests: a small data folder in the on-disk contract (manifest, pairs,
webdataset tar shards and downloads.parquet with member offsets), written with the contract's
own writer (`ovseg.curation.contract.write_contract`), so the training package is tested apart
from curation's stages."""

import io

import numpy as np
import pytest
from PIL import Image

from ovseg.curation.contract import write_contract

SHAPES = ["circle", "square", "star"]


def _image_bytes(i: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(i)
    array = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def make_contract(root, n: int = 24, corrupt: tuple[int, ...] = (), per_shard: int = 10, failed: tuple[int, ...] = (),
                  truncated: tuple[int, ...] = ()):
    """DATA folder with n samples; `corrupt` ids get non-image bytes, `truncated` ids the first
    half of a JPEG (a valid header: it opens, and fails only when decoded), `failed` ids no image."""
    rows = []
    for i in range(n):
        shape = SHAPES[i % 3]
        caption = f"a photo of a red {shape} on a striped background"
        start = caption.index("a red")
        chunks = [{"start": start, "end": start + len(f"a red {shape}"), "entity": shape},
                  {"start": caption.index("a striped"), "end": len(caption), "entity": "background"}]
        rows.append({"sample_id": i, "caption": caption, "entities": [shape], "chunks": chunks})

    def image(i: int) -> bytes | None:
        if i in failed:
            return None
        data = b"this is not a jpeg" if i in corrupt else _image_bytes(i)
        return data[:len(data) // 2] if i in truncated else data

    pairs = [{"sample_id": i, "partner_id": j, "entity": SHAPES[i % 3]}
             for i in range(n) for j in range(i % 3, n, 3) if j != i][: n * 3]
    return write_contract(root, rows, image, per_shard=per_shard, pairs=pairs)


@pytest.fixture
def contract(tmp_path):
    return make_contract(tmp_path / "DATA")
