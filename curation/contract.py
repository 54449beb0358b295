"""The on-disk data contract in code (docs/schemas.md): table paths, Arrow schemas, member reads,
image decoding and the normalisation constants.

This module is a leaf: it imports nothing else of ovseg, so training and evaluation import it
(and nothing else of curation) to read what curation writes. Every writer and reader of a table
takes the table's path and schema from here, so each is written once.

    DATA/captions/part-*.parquet    CAPTIONS_SCHEMA        ingest
    DATA/rejects.parquet            REJECTS_SCHEMA         ingest
    DATA/parsed/part-*.parquet      PARSED_SCHEMA          parse
    DATA/entities.parquet           ENTITIES_SCHEMA        select
    DATA/manifest/part-*.parquet    MANIFEST_SCHEMA        manifest
    DATA/entity_index.parquet       ENTITY_INDEX_SCHEMA    entity_index
    DATA/pairs.parquet              PAIRS_SCHEMA           pairs
    DATA/images/NNNNN.tar           webdataset shards      download (img2dataset)
    DATA/downloads.parquet          DOWNLOADS_SCHEMA       download
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import fsspec
    from PIL import Image

# ---------------------------------------------------------------------------------------------
# Paths under DATA
# ---------------------------------------------------------------------------------------------

CAPTIONS_DIR = "captions"
REJECTS_FILE = "rejects.parquet"
PARSED_DIR = "parsed"
ENTITIES_FILE = "entities.parquet"
MANIFEST_DIR = "manifest"
ENTITY_INDEX_FILE = "entity_index.parquet"
PAIRS_FILE = "pairs.parquet"
IMAGES_DIR = "images"
DOWNLOADS_FILE = "downloads.parquet"
CATALOG_FILE = "catalog.duckdb"

# catalog view name -> path under DATA (a glob for sharded tables)
TABLES = {
    "captions": f"{CAPTIONS_DIR}/part-*.parquet",
    "rejects": REJECTS_FILE,
    "parsed": f"{PARSED_DIR}/part-*.parquet",
    "entities": ENTITIES_FILE,
    "manifest": f"{MANIFEST_DIR}/part-*.parquet",
    "entity_index": ENTITY_INDEX_FILE,
    "pairs": PAIRS_FILE,
    "downloads": DOWNLOADS_FILE,
    "images": f"{IMAGES_DIR}/*.parquet",
}


def part_name(index: int) -> str:
    """The file name of part `index` of a sharded table (captions, parsed, manifest)."""
    return f"part-{index:05d}.parquet"


def shard_name(shard_id: int) -> str:
    """The stem of shard `shard_id` under DATA/images (`00003` for `00003.tar`, `00003.parquet`,
    `00003_stats.json`): img2dataset's five digits."""
    return f"{shard_id:05d}"


def join(root: str | os.PathLike, *parts: str) -> str:
    """`root/part/...` for a local path or any fsspec URL (a URL is not a `Path`)."""
    return "/".join([str(root).rstrip("/"), *parts])


def shard_path(data: str | os.PathLike, shard: str) -> str:
    """Where the tar named by a downloads row's `shard` lies: under DATA/images, unless the row
    names an absolute path or a URL."""
    return shard if "://" in shard or shard.startswith("/") else join(data, IMAGES_DIR, shard)


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

CHUNK = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("entity", pa.string())])  # caption[start:end]
CHUNKS = pa.list_(CHUNK)
ENTITY_LIST = pa.list_(pa.string())

CAPTIONS_SCHEMA = pa.schema([("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string())])
REJECTS_SCHEMA = pa.schema([("sample_id", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])
PARSED_SCHEMA = pa.schema([("sample_id", pa.int64()), ("entities", ENTITY_LIST), ("chunks", CHUNKS)])
ENTITIES_SCHEMA = pa.schema([("entity", pa.string()), ("n_samples", pa.int64()), ("n_mentions", pa.int64()),
                             ("rank", pa.int64()), ("selected", pa.bool_()), ("excluded_reason", pa.string())])
MANIFEST_SCHEMA = pa.schema([*CAPTIONS_SCHEMA, ("entities", ENTITY_LIST), ("chunks", CHUNKS)])
ENTITY_INDEX_SCHEMA = pa.schema([("entity", pa.string()), ("sample_id", pa.int64())])
PAIRS_SCHEMA = pa.schema([("sample_id", pa.int64()), ("partner_id", pa.int64()), ("entity", pa.string())])

STATUSES = ("success", "failed_to_download", "failed_to_resize", "not_downloaded")
DOWNLOADS_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("status", pa.string()),       # one of STATUSES
    ("error_message", pa.string()),
    ("shard", pa.string()),        # tar file name relative to DATA/images
    ("key", pa.string()),          # img2dataset's sample key (member name without extension)
    ("offset", pa.int64()),        # first byte of the image inside the tar
    ("size", pa.int64()),          # image bytes
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
])

# ---------------------------------------------------------------------------------------------
# Images: reading a member, decoding it, normalising it
# ---------------------------------------------------------------------------------------------

# ImageNet's per-channel mean and std (0-1 scale): the default normalisation of the model's input
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=4096)
def _filesystem(shard: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system and path of a shard, resolved once per process (resolving a URL costs
    more than the read of a small member from a local disk)."""
    import fsspec

    return fsspec.core.url_to_fs(shard)


def read_member(shard: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a tar shard (a local path or any fsspec URL): one open, one
    seek, one read."""
    fs, path = _filesystem(str(shard))
    with fs.open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{shard}: short read at {offset} ({len(data)} of {size} bytes)")
    return data


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes as an 8-bit RGB PIL image, decoded now (Pillow is lazy, so a
    truncated file fails here, not later). A 16-bit grayscale image (a 16-bit PNG: mode I;16 or
    I) is scaled to 8 bits, where a plain `convert("RGB")` would clip every value above 255."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L or I (32-bit, how 16-bit PNGs may open)
        import numpy as np

        wide = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or wide.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(wide / scale), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# A small valid DATA folder, for tests and benchmarks
# ---------------------------------------------------------------------------------------------


def write_contract(root: str | os.PathLike, samples: Sequence[Mapping],
                   images: Mapping[int, bytes | None] | Callable[[int], bytes | None], *,
                   per_shard: int = 10_000, pairs: Iterable[Mapping] | None = None,
                   entity_index: bool = False, failure: tuple[str, str] = ("failed_to_download", "HTTP Error 404: Not Found"),
                   ) -> Path:
    """Write DATA at `root` as the curation stages would: `manifest/part-00000.parquet`,
    webdataset shards `images/NNNNN.tar`, `downloads.parquet` with each member's offset and size,
    and, when asked, `pairs.parquet` and `entity_index.parquet`.

    `samples`: manifest rows (`sample_id`, `caption`, `entities`, `chunks`; `url` optional).
    `images`: sample_id -> encoded image bytes (any bytes: a test may store a corrupt image);
    a sample without bytes did not download (its row has status and message `failure`).
    Sample `i`'s image goes to shard `i // per_shard`. Returns `root`."""
    root = Path(root)
    (root / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    (root / IMAGES_DIR).mkdir(exist_ok=True)
    get = images if callable(images) else images.get
    manifest = [{"url": f"http://127.0.0.1/{int(s['sample_id'])}.jpg", **s} for s in samples]
    manifest.sort(key=lambda row: int(row["sample_id"]))
    by_shard: dict[int, list[tuple[int, bytes]]] = {}
    failed = []
    for row in manifest:
        sample_id = int(row["sample_id"])
        data = get(sample_id)
        if data is None:
            failed.append(sample_id)
        else:
            by_shard.setdefault(sample_id // per_shard, []).append((sample_id, data))
    downloads = [{"sample_id": i, "status": failure[0], "error_message": failure[1]} for i in failed]
    for shard_id, members in sorted(by_shard.items()):
        name = f"{shard_name(shard_id)}.tar"
        with tarfile.open(root / IMAGES_DIR / name, "w") as tar:
            for sample_id, data in members:
                info = tarfile.TarInfo(f"{sample_id:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(root / IMAGES_DIR / name) as tar:
            for member, (sample_id, data) in zip(tar.getmembers(), members):
                width, height = _size_of(data)
                downloads.append({"sample_id": sample_id, "status": "success", "error_message": None,
                                  "shard": name, "key": f"{sample_id:09d}", "offset": member.offset_data,
                                  "size": member.size, "width": width, "height": height,
                                  "original_width": width, "original_height": height})
    downloads.sort(key=lambda row: row["sample_id"])
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), root / MANIFEST_DIR / part_name(0))
    pq.write_table(pa.Table.from_pylist(downloads, schema=DOWNLOADS_SCHEMA), root / DOWNLOADS_FILE)
    if pairs is not None:
        pq.write_table(pa.Table.from_pylist(list(pairs), schema=PAIRS_SCHEMA), root / PAIRS_FILE)
    if entity_index:
        rows = sorted({(e, int(r["sample_id"])) for r in manifest for e in r.get("entities") or []})
        pq.write_table(pa.Table.from_pylist([{"entity": e, "sample_id": i} for e, i in rows],
                                            schema=ENTITY_INDEX_SCHEMA), root / ENTITY_INDEX_FILE)
    return root


def _size_of(data: bytes) -> tuple[int | None, int | None]:
    """(width, height) from the image's header, or (None, None) when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        return None, None
