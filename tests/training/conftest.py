"""Fixtures for training tests: a small data folder in the on-disk contract (manifest, pairs,
webdataset tar shards and downloads.parquet with member offsets), written by hand so the
training package is tested apart from curation."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

SHAPES = ["circle", "square", "star"]
CHUNK_TYPE = pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32()), ("entity", pa.string())]))


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
    (root / "manifest").mkdir(parents=True)
    (root / "images").mkdir()
    rows, downloads = [], []
    for i in range(n):
        shape = SHAPES[i % 3]
        caption = f"a photo of a red {shape} on a striped background"
        start = caption.index("a red")
        chunks = [{"start": start, "end": start + len(f"a red {shape}"), "entity": shape},
                  {"start": caption.index("a striped"), "end": len(caption), "entity": "background"}]
        rows.append({"sample_id": i, "url": f"http://127.0.0.1/{i}.jpg", "caption": caption,
                     "entities": [shape], "chunks": chunks})
    shard_rows: dict[int, list[int]] = {}
    for i in range(n):
        if i not in failed:
            shard_rows.setdefault(i // per_shard, []).append(i)
    for shard, ids in shard_rows.items():
        name = f"{shard:05d}.tar"
        with tarfile.open(root / "images" / name, "w") as tar:
            for i in ids:
                data = b"this is not a jpeg" if i in corrupt else _image_bytes(i)
                if i in truncated:
                    data = data[:len(data) // 2]
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(root / "images" / name) as tar:
            for member in tar.getmembers():
                i = int(member.name.split(".")[0])
                downloads.append({"sample_id": i, "status": "success", "error_message": None,
                                  "shard": name, "offset": member.offset_data, "size": member.size,
                                  "width": 32, "height": 32})
    for i in failed:
        downloads.append({"sample_id": i, "status": "failed_to_download", "error_message": "404",
                          "shard": None, "offset": None, "size": None, "width": None, "height": None})
    manifest = pa.table({
        "sample_id": pa.array([r["sample_id"] for r in rows], pa.int64()),
        "url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
        "entities": pa.array([r["entities"] for r in rows], pa.list_(pa.string())),
        "chunks": pa.array([r["chunks"] for r in rows], CHUNK_TYPE),
    })
    pq.write_table(manifest, root / "manifest" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(downloads, schema=pa.schema([
        ("sample_id", pa.int64()), ("status", pa.string()), ("error_message", pa.string()),
        ("shard", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
        ("width", pa.int32()), ("height", pa.int32())])), root / "downloads.parquet")
    pairs = [{"sample_id": i, "partner_id": j, "entity": SHAPES[i % 3]}
             for i in range(n) for j in range(i % 3, n, 3) if j != i][: n * 3]
    pq.write_table(pa.Table.from_pylist(pairs, schema=pa.schema([
        ("sample_id", pa.int64()), ("partner_id", pa.int64()), ("entity", pa.string())])), root / "pairs.parquet")
    return root


@pytest.fixture
def contract(tmp_path):
    return make_contract(tmp_path / "DATA")
