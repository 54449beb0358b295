"""The download stage: img2dataset over the manifest, then `downloads.parquet` (docs/download.md).

    DATA/manifest/part-*.parquet   (input: sample_id, url, caption, ...)
    DATA/images/00000.tar ...      img2dataset's webdataset shards, with its 00000.parquet and
                                   00000_stats.json per shard (the stats file is written last)
    DATA/downloads.parquet         one row per manifest sample: sample_id, status, error_message,
                                   shard, offset, size, width, height, ... (offset and size of the
                                   image's bytes inside its tar, for reading it with one seek)
    DATA/.download/                the URL list given to img2dataset, its log, and the run state

img2dataset runs in a child process (`ovseg.curation._download_worker`). A rerun after a crash
or a kill lets img2dataset skip every shard whose stats file exists (incremental mode) and
download only the shards that did not finish; the join then covers all shards again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ovseg.curation._download_worker import QUIET_ENV
from ovseg.curation.contract import (CAPTIONS_SCHEMA, DOWNLOADS_FILE, DOWNLOADS_SCHEMA, IMAGES_DIR, MANIFEST_DIR,
                                     STATUSES, decode_image, join, read_member, shard_name, shard_path)

log = logging.getLogger(__name__)

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# STATUSES, DOWNLOADS_SCHEMA (the columns of downloads.parquet), shard_name and read_member are
# the contract's (ovseg.curation.contract), where training reads them; this stage's callers may
# still import them from here.


class DownloadError(RuntimeError):
    """A download stage that cannot run or did not finish (the message says what to do)."""


@dataclass
class DownloadConfig:
    """Options of the download stage; most are img2dataset's own (same names in its docs)."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"          # img2dataset: no, border, keep_ratio, keep_ratio_largest, center_crop
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 64                        # download threads per process
    shard_size: int = 10_000                 # images per tar shard
    timeout: float = 10.0                    # seconds per request
    retries: int = 0
    distributor: str = "multiprocessing"     # or pyspark, ray (multi-machine: docs/download.md)
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = math.inf         # larger source images fail with failed_to_resize
    max_aspect_ratio: float = math.inf
    max_shard_retry: int = 1
    extra: dict = field(default_factory=dict)  # any other img2dataset.download keyword

    def validate(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor must be one of {', '.join(DISTRIBUTORS)}, not {self.distributor!r}")
        for name in ("image_size", "processes", "threads", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1")
        if self.distributor != "multiprocessing":
            import importlib.util

            if importlib.util.find_spec(self.distributor) is None:
                raise ValueError(f"the {self.distributor} distributor needs `pip install {self.distributor}`")

    def output_settings(self) -> dict:
        """The options that change what is written; a resume must use the same ones."""
        out = {k: getattr(self, k) for k in ("image_size", "resize_mode", "shard_size", "encode_format",
                                             "encode_quality", "min_image_size")}
        out.update(max_image_area=float(self.max_image_area), max_aspect_ratio=float(self.max_aspect_ratio))
        return out


@dataclass
class DownloadResult:
    path: Path                       # DATA/downloads.parquet
    counts: dict[str, int]           # samples per status
    shards: int
    seconds: float
    skipped: bool = False            # already complete: nothing ran

    @property
    def complete(self) -> bool:
        return self.counts.get("not_downloaded", 0) == 0


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def download(data_dir: str | os.PathLike, cfg: Optional[DownloadConfig] = None, force: bool = False,
             progress: bool = True, new_manifest_restarts: bool = False) -> DownloadResult:
    """Download the manifest's images into DATA/images with img2dataset and write
    DATA/downloads.parquet. Resumes an interrupted run; skipped when complete unless `force`.

    Shards of another manifest (same output options) are refused, or with `new_manifest_restarts`
    deleted and the new manifest downloaded (what `ovseg curate cc12m` does after a new selection)."""
    cfg = cfg or DownloadConfig()
    cfg.validate()
    start = time.perf_counter()
    data = Path(data_dir)
    urls = read_manifest_urls(data)
    with _exclusive(data / ".download"):
        return _download(data, urls, cfg, force, progress, start, new_manifest_restarts)


def _download(data: Path, urls: pa.Table, cfg: DownloadConfig, force: bool, progress: bool,
              start: float, new_manifest_restarts: bool = False) -> DownloadResult:
    work, images, out = data / ".download", data / IMAGES_DIR, data / DOWNLOADS_FILE
    fingerprint = _fingerprint(urls, cfg)
    state = _read_state(work)
    if new_manifest_restarts and state.get("fingerprint") not in (None, fingerprint):
        before = state.get("output_settings", {})
        force = force or all(before.get(k, v) == v for k, v in _plain_settings(cfg).items())

    if force:
        shutil.rmtree(images, ignore_errors=True)
        for stale in work.iterdir():  # all but the lock held now
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.name != "lock":
                stale.unlink()
        out.unlink(missing_ok=True)
        state = {}
    elif state.get("fingerprint") not in (None, fingerprint) and _done_shards(images):
        before = state.get("output_settings", {})
        changed = [f"{k} {before[k]} -> {v}" for k, v in _plain_settings(cfg).items() if k in before and before[k] != v]
        what = f"other options ({', '.join(changed)})" if changed else "a different manifest"
        raise DownloadError(f"{images} holds a download of {what}; "
                            f"`ovseg curate download {data} --force` starts over")
    elif state.get("fingerprint") == fingerprint and state.get("complete") and out.exists():
        counts = _status_counts(out)
        _update_catalog(data)  # a copied DATA's catalog names its own files after any rerun
        return DownloadResult(out, counts, state.get("shards", 0), time.perf_counter() - start, skipped=True)

    n_shards = math.ceil(urls.num_rows / cfg.shard_size)
    work.mkdir(parents=True, exist_ok=True)
    _write_state(work, {"fingerprint": fingerprint, "config": _plain(cfg), "output_settings": _plain_settings(cfg),
                        "samples": urls.num_rows, "shards": n_shards, "complete": False})
    if urls.num_rows:
        url_list = work / "urls.parquet"
        _write_parquet(urls, url_list)
        run_img2dataset(url_list, images, cfg, log_path=work / "img2dataset.log", n_shards=n_shards,
                        progress=progress)
    table = join_downloads(urls, images, cfg, cache=work / "shards")
    _write_parquet(table, out)
    counts = _status_counts(out)
    complete = counts.get("not_downloaded", 0) == 0
    _write_state(work, {"fingerprint": fingerprint, "config": _plain(cfg), "output_settings": _plain_settings(cfg),
                        "samples": urls.num_rows, "shards": n_shards, "complete": complete})
    _update_catalog(data)
    return DownloadResult(out, counts, n_shards, time.perf_counter() - start)


def read_manifest_urls(data: Path) -> pa.Table:
    """sample_id, url, caption of every manifest sample, sorted by sample_id (the order img2dataset
    shards in, so shard k always holds the same samples)."""
    manifest = Path(data) / MANIFEST_DIR
    files = sorted(manifest.glob("part-*.parquet")) if manifest.is_dir() else []
    if not files:
        raise DownloadError(f"no manifest in {manifest} (run `ovseg curate manifest {data}` first)")
    table = ds.dataset([str(f) for f in files], format="parquet").to_table(columns=["sample_id", "url", "caption"])
    table = table.cast(CAPTIONS_SCHEMA)
    return table.sort_by("sample_id")


def img2dataset_arguments(url_list: str | os.PathLike, output_folder: str | os.PathLike, cfg: DownloadConfig) -> dict:
    """Keyword arguments of img2dataset.download for our URL list (parquet: sample_id, url, caption)."""
    kwargs = dict(
        url_list=str(url_list), output_folder=str(output_folder), input_format="parquet", url_col="url",
        caption_col="caption", save_additional_columns=["sample_id"], output_format="webdataset",
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, processes_count=cfg.processes,
        thread_count=cfg.threads, number_sample_per_shard=cfg.shard_size, timeout=cfg.timeout,
        retries=cfg.retries, distributor=cfg.distributor, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio,
        max_shard_retry=cfg.max_shard_retry, incremental_mode="incremental", enable_wandb=False,
    )
    kwargs.update(cfg.extra)
    return kwargs


def worker_env() -> dict[str, str]:
    """The child's environment: no update checks or telemetry, loopback never through a proxy."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    for key in ("no_proxy", "NO_PROXY"):
        hosts = [h for h in env.get(key, "").split(",") if h]
        env[key] = ",".join(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    return env


def run_img2dataset(url_list: Path, output_folder: Path, cfg: DownloadConfig, log_path: Path,
                    n_shards: int = 0, progress: bool = True) -> None:
    """Run img2dataset in a child process (same process group: Ctrl-C stops all of it), with a
    progress bar over finished shards. Raises DownloadError if it fails."""
    args_path = log_path.with_name("img2dataset_args.json")
    args_path.write_text(json.dumps(img2dataset_arguments(url_list, output_folder, cfg), indent=1))
    command = [sys.executable, "-m", "ovseg.curation._download_worker", str(args_path)]
    before = len(_done_shards(output_folder))
    with open(log_path, "ab") as logf, _shard_bar(n_shards, before, progress) as bar:
        env = worker_env()
        env["OVSEG_DOWNLOAD_PARENT"] = str(os.getpid())  # the child stops if this process dies
        child = subprocess.Popen(command, stdout=logf, stderr=subprocess.STDOUT, env=env)
        seen: dict[Path, tuple[int, int]] = {}

        def refresh() -> None:
            done = _done_shards(output_folder)
            for path in done.values():
                if path not in seen:
                    try:
                        stats = json.loads(path.read_text())
                    except (OSError, json.JSONDecodeError):
                        # being written now, or cut short by a kill of an earlier run (the
                        # shard's data was complete before its stats): read again next time
                        continue
                    seen[path] = (stats["count"], stats["successes"])
            if len(done) > bar.n:
                images, ok = (sum(v) for v in zip(*seen.values())) if seen else (0, 0)
                bar.set_postfix_str(f"{images} images, {100 * ok / max(images, 1):.0f}% ok", refresh=False)
                bar.update(len(done) - bar.n)

        try:
            while child.poll() is None:
                time.sleep(0.5)
                refresh()
        except BaseException:  # Ctrl-C (which reached the child too) or an error here: stop the child
            child.send_signal(signal.SIGINT)  # img2dataset's handler stops its pool and exits
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
        refresh()
    if child.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise DownloadError(f"img2dataset exited with status {child.returncode}; log {log_path}:\n" + "\n".join(tail))


@contextlib.contextmanager
def _exclusive(work: Path):
    """One download at a time per data folder."""
    import fcntl

    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another download is running in {work.parent}") from None
        yield


def _shard_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="download shards", unit="shard", disable=not enabled)


# ---------------------------------------------------------------------------------------------
# The join: img2dataset's per-shard parquet + tar headers -> downloads.parquet
# ---------------------------------------------------------------------------------------------


def _done_shards(images: Path) -> dict[int, Path]:
    """Shards img2dataset finished (its stats file is written last)."""
    if not images.is_dir():
        return {}
    return {int(p.name.split("_")[0]): p for p in images.glob("*_stats.json")}


def member_offsets(tar_path: str, extension: str) -> dict[str, tuple[int, int]]:
    """key -> (offset, size) of each `key.extension` member's data, from the tar headers only
    (a seek over every member's data). Reads ustar headers and the per-member pax headers that
    webdataset writes directly; any other header kind falls back to the tarfile module."""
    suffix = "." + extension
    offsets: dict[str, tuple[int, int]] = {}
    opener = open if "://" not in str(tar_path) else fsspec.open  # plain files: no fsspec layer per read
    with opener(tar_path, "rb") as f:
        position, pax = 0, {}
        while True:
            f.seek(position)
            header = f.read(512)
            if len(header) < 512 or header == _ZERO_BLOCK:
                return offsets
            kind, size = header[156:157], _header_size(header[124:136], tar_path, position)
            if header[257:262] != b"ustar" or kind not in (b"0", b"\0", b"x"):  # GNU long names, links, ...
                return _member_offsets_tarfile(tar_path, suffix)
            if kind == b"x":  # pax header of the next member: may set its path and size
                pax = _pax_records(f.read(size))
            else:
                name = pax.get("path")
                if name is None:
                    name = header[:100].split(b"\0", 1)[0].decode()
                    prefix = header[345:500].split(b"\0", 1)[0].decode()
                    name = f"{prefix}/{name}" if prefix else name
                size = _checked_size(pax.get("size", size), tar_path, position)
                if name.endswith(suffix):
                    offsets[name[: -len(suffix)]] = (position + 512, size)
                pax = {}
            position += 512 + (size + 511) // 512 * 512


def _header_size(field: bytes, tar_path, position: int) -> int:
    """A ustar header's size field (octal, or base-256 when its top bit is set), checked."""
    if field[:1] and field[0] & 0x80:  # GNU base-256: a negative one starts with 0xff
        if field[0] == 0xFF:
            raise DownloadError(f"{tar_path}: damaged tar header at byte {position} (negative size)")
        return _checked_size(int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big"), tar_path, position)
    text = field.split(b"\0", 1)[0].strip() or b"0"
    try:
        return _checked_size(int(text, 8), tar_path, position)
    except ValueError:
        raise DownloadError(f"{tar_path}: damaged tar header at byte {position} "
                            f"(size {text.decode('ascii', 'replace')!r})") from None


def _checked_size(value, tar_path, position: int) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise DownloadError(f"{tar_path}: damaged tar header at byte {position} (size {value!r})") from None
    if size < 0:
        raise DownloadError(f"{tar_path}: damaged tar header at byte {position} (negative size {size})")
    return size


def _pax_records(data: bytes) -> dict[str, str]:
    """`LEN key=value\n` records of a pax extended header."""
    records, i = {}, 0
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += length
    return records


_ZERO_BLOCK = bytes(512)


def _member_offsets_tarfile(tar_path: str, suffix: str) -> dict[str, tuple[int, int]]:
    offsets: dict[str, tuple[int, int]] = {}
    with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(suffix):
                offsets[member.name[: -len(suffix)]] = (member.offset_data, member.size)
    return offsets


def shard_rows(images: Path, shard_id: int, cfg: DownloadConfig) -> pa.Table:
    """downloads.parquet rows of one finished shard: img2dataset's metadata joined with the
    offsets of the images in the tar."""
    name = shard_name(shard_id)
    meta = pq.read_table(images / f"{name}.parquet",
                         columns=["sample_id", "key", "status", "error_message", "width", "height",
                                  "original_width", "original_height"])
    offsets = member_offsets(str(images / f"{name}.tar"), cfg.encode_format)
    status = meta["status"].to_pylist()
    errors = meta["error_message"].to_pylist()
    located = [offsets.get(k) if s == "success" else None for k, s in zip(meta["key"].to_pylist(), status)]
    for i, (s, where) in enumerate(zip(status, located)):
        if s == "success" and where is None:  # should not happen: the image is not in the tar
            status[i], errors[i] = "failed_to_download", "image missing from the shard"
    return pa.table({
        "sample_id": meta["sample_id"].cast(pa.int64()),
        "status": pa.array(status, pa.string()),
        "error_message": pa.array(errors, pa.string()),
        "shard": pa.array([f"{name}.tar"] * meta.num_rows, pa.string()),
        "key": meta["key"].cast(pa.string()),
        "offset": pa.array([w[0] if w else None for w in located], pa.int64()),
        "size": pa.array([w[1] if w else None for w in located], pa.int64()),
        "width": meta["width"].cast(pa.int32()),
        "height": meta["height"].cast(pa.int32()),
        "original_width": meta["original_width"].cast(pa.int32()),
        "original_height": meta["original_height"].cast(pa.int32()),
    }, schema=DOWNLOADS_SCHEMA)


def join_downloads(urls: pa.Table, images: Path, cfg: DownloadConfig, cache: Optional[Path] = None) -> pa.Table:
    """One row per sample of `urls`: img2dataset's status for it, and where its image lies.
    With `cache`, each finished shard's rows are kept there, so a resumed run reads the tar
    headers of new shards only."""
    parts = []
    for shard_id, stats in sorted(_done_shards(images).items()):
        cached = cache / f"{shard_name(shard_id)}.parquet" if cache is not None else None
        if cached is not None and cached.exists() and cached.stat().st_mtime_ns >= stats.stat().st_mtime_ns:
            parts.append(pq.read_table(cached).cast(DOWNLOADS_SCHEMA))
            continue
        rows = shard_rows(images, shard_id, cfg)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _write_parquet(rows, cached)
        parts.append(rows)
    found = pa.concat_tables(parts) if parts else DOWNLOADS_SCHEMA.empty_table()
    # Exactly one row per manifest sample: samples of unfinished shards are `not_downloaded`.
    found = found.filter(pc.is_in(found["sample_id"], value_set=urls["sample_id"]))
    missing_ids = pc.filter(urls["sample_id"], pc.invert(pc.is_in(urls["sample_id"], value_set=found["sample_id"])))
    if len(missing_ids):
        n = len(missing_ids)
        missing = pa.table({
            "sample_id": missing_ids,
            "status": pa.array(["not_downloaded"] * n, pa.string()),
            "error_message": pa.array(["its shard did not finish; rerun `ovseg curate download` to resume"] * n),
            **{c.name: pa.nulls(n, c.type) for c in DOWNLOADS_SCHEMA if c.name not in ("sample_id", "status", "error_message")},
        }, schema=DOWNLOADS_SCHEMA)
        found = pa.concat_tables([found, missing])
    return found.sort_by("sample_id")


# ---------------------------------------------------------------------------------------------
# Reading images back
# ---------------------------------------------------------------------------------------------


def lookup(data: str | os.PathLike, sample_id: int) -> dict:
    """The downloads.parquet row of one sample (data: DATA as a path or an fsspec URL)."""
    with fsspec.open(join(data, DOWNLOADS_FILE), "rb") as f:
        table = pq.read_table(f, filters=[("sample_id", "=", int(sample_id))])
    if table.num_rows == 0:
        raise KeyError(f"sample {sample_id} is not in {join(data, DOWNLOADS_FILE)}")
    return table.to_pylist()[0]


def read_image_bytes(data: str | os.PathLike, sample_id: int) -> bytes:
    """The encoded image of one downloaded sample, read with one seek into its shard."""
    row = lookup(data, sample_id)
    if row["status"] != "success":
        raise KeyError(f"sample {sample_id} did not download ({row['status']}: {row['error_message']})")
    return read_member(shard_path(data, row["shard"]), row["offset"], row["size"])


def read_image(data: str | os.PathLike, sample_id: int):
    """The downloaded image of one sample as a PIL image (8-bit RGB, as training decodes it)."""
    return decode_image(read_image_bytes(data, sample_id))


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _fingerprint(urls: pa.Table, cfg: DownloadConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.output_settings(), sort_keys=True, default=str).encode())
    for column in ("sample_id", "url"):
        for chunk in urls[column].chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    h.update(buffer)
    return h.hexdigest()


def _plain(cfg: DownloadConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _plain_settings(cfg: DownloadConfig) -> dict:
    return json.loads(json.dumps(cfg.output_settings(), default=str))


def _read_state(work: Path) -> dict:
    try:
        return json.loads((work / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(work: Path, state: dict) -> None:
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(work / "state.json")


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _status_counts(path: Path) -> dict[str, int]:
    status = pq.read_table(path, columns=["status"])["status"]
    counts = pc.value_counts(status).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def _update_catalog(data: Path) -> None:
    """Let the catalog gain downloads.parquet (the curation stages own the catalog)."""
    try:
        from ovseg.curation.catalog import build_catalog
    except ImportError:
        log.debug("no catalog module; skipping catalog update")
        return
    build_catalog(data)
