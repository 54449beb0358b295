"""The ingest stage: a caption source into ``DATA/captions/part-*.parquet`` and ``DATA/rejects.parquet``.

Sources are read through fsspec, so a local path, ``http(s)://``, ``s3://``, ``gs://`` ... all
work, and gzip, bzip2, xz and zstd sources are decompressed whatever their name (told by their
first bytes). Two kinds:

- CC12M's TSV: ``url<TAB>caption`` per line, no header (:func:`ingest_tsv`);
- any tsv/csv/parquet table with named url and caption columns (:func:`ingest_table`).

``sample_id`` is the 0-based row number in the source, so it is stable across runs and machines.
Every source row ends up in exactly one of captions/ and rejects.parquet, with the reason.

A new ingest writes into ``captions.tmp/`` and swaps it in only when the whole source was read
and kept at least one row: a missing, empty or unreadable source leaves a finished DATA as it was.
"""

from __future__ import annotations

import io
import logging
import lzma
import shutil
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from ovseg.curation import stage
from ovseg.curation.contract import CAPTIONS_DIR, CAPTIONS_SCHEMA, REJECTS_FILE, REJECTS_SCHEMA

log = logging.getLogger(__name__)

CC12M_URL = "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"


# Reasons a source row is rejected (the `reason` column of rejects.parquet).
NO_TAB = "no_tab"
EXTRA_TAB = "extra_tab"
EMPTY_URL = "empty_url"
EMPTY_CAPTION = "empty_caption"
BAD_URL = "not_http_url"
UNDECODABLE = "undecodable_utf8"
TOO_LONG = "caption_too_long"
NUL = "nul_character"
FIELDS = "wrong_field_count"   # a table row with more or fewer fields than its header

RAW_CHARS = 200  # rejects keep this much of the raw row


@dataclass(frozen=True)
class IngestConfig:
    shard_size: int = 100_000        # rows per captions part (the unit of parallel parsing)
    max_caption_chars: int = 1_000   # longer captions are rejected (CC12M's longest real ones are ~ 600)


@dataclass
class IngestResult:
    rows: int
    kept: int
    rejected: int
    reasons: dict[str, int]
    skipped: bool = False


def check_row(url: str, caption: str, max_caption_chars: int) -> str | None:
    """The reason a (url, caption) row is rejected, or None when it is kept."""
    if not url:
        return EMPTY_URL
    if not caption:
        return EMPTY_CAPTION
    lowered = url[:8].lower()
    if not (lowered.startswith("http://") or lowered.startswith("https://")) or any(c.isspace() for c in url):
        return BAD_URL
    if not _host(url):
        return BAD_URL
    if "\0" in url or "\0" in caption:
        return NUL
    if len(caption) > max_caption_chars:
        return TOO_LONG
    return None


def _host(url: str) -> str:
    import urllib.parse

    try:
        return urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return ""


def split_tsv_line(raw: bytes, max_caption_chars: int) -> tuple[str, str] | str:
    """(url, caption) of one CC12M line (without its newline), or the reason it is rejected."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return UNDECODABLE
    if line.endswith("\r"):
        line = line[:-1]
    fields = line.split("\t")
    if len(fields) < 2:
        return NO_TAB
    if len(fields) > 2:
        return EXTRA_TAB
    url, caption = fields[0].strip(), fields[1].strip()
    return check_row(url, caption, max_caption_chars) or (url, caption)


class _ShardWriter:
    """Accumulates kept rows into captions parts of `shard_size` rows, and rejects."""

    def __init__(self, data: Path, shard_size: int):
        self.folder = stage.reset_dir(Path(data) / f"{CAPTIONS_DIR}.tmp")  # swapped in by commit()
        self.data = Path(data)
        self.shard_size = shard_size
        self.ids: list[int] = []
        self.urls: list[str] = []
        self.captions: list[str] = []
        self.rejects: dict[str, list] = {"sample_id": [], "reason": [], "raw": []}
        self.n_parts = 0
        self.rows = 0
        self.kept = 0

    def add(self, sample_id: int, result: tuple[str, str] | str, raw: str) -> None:
        self.rows += 1
        if isinstance(result, str):
            self.rejects["sample_id"].append(sample_id)
            self.rejects["reason"].append(result)
            self.rejects["raw"].append(raw[:RAW_CHARS])
            return
        self.ids.append(sample_id)
        self.urls.append(result[0])
        self.captions.append(result[1])
        self.kept += 1
        if len(self.ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        table = pa.table([self.ids, self.urls, self.captions], schema=CAPTIONS_SCHEMA)
        stage.write_parquet_atomic(table, self.folder / stage.part_name(self.n_parts))
        self.n_parts += 1
        self.ids, self.urls, self.captions = [], [], []

    def close(self) -> IngestResult:
        self.flush()
        if self.n_parts == 0:  # an empty part keeps the folder a readable table
            stage.write_parquet_atomic(CAPTIONS_SCHEMA.empty_table(), self.folder / stage.part_name(0))
            self.n_parts = 1
        rejects = pa.table(self.rejects, schema=REJECTS_SCHEMA)
        stage.write_parquet_atomic(rejects, self.data / f"{REJECTS_FILE}.new")
        reasons: dict[str, int] = {}
        for reason in self.rejects["reason"]:
            reasons[reason] = reasons.get(reason, 0) + 1
        return IngestResult(self.rows, self.kept, len(self.rejects["reason"]), dict(sorted(reasons.items())))

    def commit(self, source, result: IngestResult) -> IngestResult:
        """Swap the new captions and rejects in (the earlier ones stay until here), or refuse a
        source that kept no row."""
        if result.kept == 0:
            self.discard()
            if result.rows == 0:
                raise stage.StageError(f"caption source {source} holds no row; {self.data} is left as it was")
            reasons = ", ".join(f"{n} {r}" for r, n in result.reasons.items())
            raise stage.StageError(f"no row of {source} was kept ({result.rows} rejected: {reasons}); "
                                   f"{self.data} is left as it was")
        stage.start(self.data, "ingest")  # later stages must rerun over the new captions
        old, new, final = self.data / f"{CAPTIONS_DIR}.old", self.folder, self.data / CAPTIONS_DIR
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        new.rename(final)
        (self.data / f"{REJECTS_FILE}.new").replace(self.data / REJECTS_FILE)
        if old.exists():
            shutil.rmtree(old)
        return result

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.data / f"{REJECTS_FILE}.new").unlink(missing_ok=True)


# First bytes of the compressed formats a source may come in (whatever its name says).
_MAGIC = {"gzip": b"\x1f\x8b\x08", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def compression_of(head: bytes) -> str | None:
    """The compression a source's first bytes show, or None for plain bytes."""
    for name, magic in _MAGIC.items():
        if head.startswith(magic) and (name != "bz2" or head[3:4] in b"123456789"):
            return name
    return None


class _Prefixed(io.RawIOBase):
    """A read-only stream of `head` followed by the rest of `raw`, any object with `read(n)`
    (`head` was read to sniff it; empty to wrap a reader as a raw stream)."""

    def __init__(self, head: bytes, raw):
        super().__init__()
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = len(buffer)
        if self.head:
            chunk, self.head = self.head[:n], self.head[n:]
        else:
            chunk = self.raw.read(n)
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


def open_source(source) -> tuple[object, object, str | None]:
    """(decompressed binary stream, the raw file (for progress), compression) of `source`.

    The compression is told by the first bytes, not the name (a gzip file without `.gz` is
    still read as gzip); a missing source is a StageError."""
    import fsspec

    try:
        raw = fsspec.open(str(source), "rb", compression=None).open()
    except (FileNotFoundError, OSError, ValueError) as error:
        raise stage.StageError(f"cannot open caption source {source}: {error}") from error
    try:
        head = raw.read(8)
    except OSError as error:
        raw.close()
        raise stage.StageError(f"cannot read caption source {source}: {error}") from error
    kind = compression_of(head)
    stream = _Prefixed(head, raw)
    if kind == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=stream, mode="rb"), raw, kind
    if kind == "bz2":
        import bz2

        return bz2.BZ2File(stream, "rb"), raw, kind
    if kind == "xz":
        import lzma

        return lzma.LZMAFile(stream, "rb"), raw, kind
    if kind == "zstd":  # pyarrow's own zstd: no extra package
        zstd = pa.CompressedInputStream(pa.PythonFile(stream, mode="r"), "zstd")
        return io.BufferedReader(_Prefixed(b"", zstd), 1 << 20), raw, kind
    return io.BufferedReader(stream, 1 << 20), raw, None


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0,
                disable=None)


def _settings(kind: str, source: str, cfg: IngestConfig, **extra) -> dict:
    return {"kind": kind, "source": str(source), **asdict(cfg), **extra}


def _skip(data: Path, settings: dict, force: bool) -> IngestResult | None:
    if force or not stage.is_done(data, "ingest", settings):
        return None
    counts = stage.read_marker(data, "ingest")["counts"]
    stage.refresh_catalog(data)
    return IngestResult(counts["rows"], counts["kept"], counts["rejected"], counts["reasons"], skipped=True)


def _finish(data: Path, settings: dict, result: IngestResult) -> IngestResult:
    assert result.rows == result.kept + result.rejected
    stage.finish(data, "ingest", settings, {"rows": result.rows, "kept": result.kept,
                                            "rejected": result.rejected, "reasons": result.reasons})
    from ovseg.curation.catalog import build_catalog

    build_catalog(data)
    return result


# a compressed source whose stream is corrupt: lzma and zlib raise their own errors, not OSError
_CORRUPT = (lzma.LZMAError, zlib.error)


def _read_error(source, error: Exception) -> stage.StageError:
    return stage.StageError(f"cannot read caption source {source}: {error}")


def ingest_tsv(source: str | Path, data: Path, cfg: IngestConfig = IngestConfig(), force: bool = False) -> IngestResult:
    """Ingest CC12M's TSV (``url<TAB>caption`` per line, no header) from a path or fsspec URL."""
    data = Path(data)
    settings = _settings("tsv", source, cfg)
    if (done := _skip(data, settings, force)) is not None:
        return done
    f, raw, _ = open_source(source)  # before anything in DATA changes
    writer = _ShardWriter(data, cfg.shard_size)
    try:
        size = getattr(raw, "size", None)
        total = size if isinstance(size, int) else None
        with _progress(total, "ingest") as bar:
            sample_id = 0
            pending = b""
            while True:
                try:
                    block = f.read(8 << 20)
                except (OSError, EOFError, ValueError, pa.ArrowException, *_CORRUPT) as error:
                    raise _read_error(source, error) from error
                if not block:
                    break
                _advance(bar, raw)
                lines = (pending + block).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    writer.add(sample_id, split_tsv_line(line, cfg.max_caption_chars),
                               line.decode("utf-8", errors="backslashreplace"))
                    sample_id += 1
            if pending:  # a last line without a newline is still a row
                writer.add(sample_id, split_tsv_line(pending, cfg.max_caption_chars),
                           pending.decode("utf-8", errors="backslashreplace"))
        result = writer.close()
    except BaseException:
        writer.discard()
        raise
    finally:
        f.close()
    return _finish(data, settings, writer.commit(source, result))


def _advance(bar, raw) -> None:
    try:
        bar.update(raw.tell() - bar.n)
    except (OSError, AttributeError, ValueError):
        pass


def _format_of(source, fmt: str | None) -> str:
    name = str(source).lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    fmt = fmt or next((f for f in ("parquet", "tsv", "csv") if name.endswith("." + f)), None)
    if fmt not in ("parquet", "tsv", "csv"):
        raise stage.StageError(f"cannot tell the format of {source}; pass --format tsv, csv or parquet")
    return fmt


def _missing_columns(source, wanted: list[str], columns: list[str]) -> stage.StageError:
    missing = [c for c in wanted if c not in columns]
    return stage.StageError(f"{source} has no column {', '.join(map(repr, missing))} "
                            f"(columns: {', '.join(columns)}); use --url-col/--caption-col")


def _parquet_rows(source, url_col: str, caption_col: str):
    """(url, caption, raw) of each row of a Parquet source; the column check comes first."""
    import fsspec
    import pyarrow.parquet as pq

    try:
        f = fsspec.open(str(source), "rb").open()
        parquet = pq.ParquetFile(f)
    except (FileNotFoundError, OSError, ValueError, pa.ArrowInvalid) as error:
        raise stage.StageError(f"cannot read {source} as parquet: {error}") from error
    columns = parquet.schema_arrow.names
    if url_col not in columns or caption_col not in columns:
        f.close()
        raise _missing_columns(source, [url_col, caption_col], columns)

    def rows():
        try:
            for batch in parquet.iter_batches(batch_size=65536, columns=[url_col, caption_col]):
                urls = batch.column(0).cast(pa.string()).to_pylist()
                captions = batch.column(1).cast(pa.string()).to_pylist()
                for url, caption in zip(urls, captions):
                    yield url, caption, f"{url}\t{caption}"
        except (OSError, pa.ArrowException) as error:
            raise _read_error(source, error) from error
        finally:
            f.close()
    return rows()


def _text_rows(source, fmt: str, url_col: str, caption_col: str):
    """(url, caption, raw) of each row of a tsv/csv source (a bad row gives a reason instead of a
    url); the header check comes first."""
    import csv
    import io
    import sys

    stream, _, _ = open_source(source)
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    csv.field_size_limit(sys.maxsize)  # long captions become caption_too_long rejects, not errors
    reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
    try:
        header = next(reader, None)
    except (csv.Error, OSError, EOFError, ValueError, *_CORRUPT) as error:
        text.close()
        raise _read_error(source, error) from error
    if header is None:
        text.close()
        raise stage.StageError(f"caption source {source} holds no row; nothing was changed")
    if url_col not in header or caption_col not in header:
        text.close()
        raise _missing_columns(source, [url_col, caption_col], header)
    at_url, at_caption, width = header.index(url_col), header.index(caption_col), len(header)

    def rows():
        try:
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:  # e.g. a NUL the csv module refuses: this row only
                    yield None, FIELDS, str(error)
                    continue
                raw = "\t".join(row).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                if len(row) != width:
                    yield None, FIELDS, raw
                elif any(_has_surrogate(v) for v in (row[at_url], row[at_caption])):
                    yield None, UNDECODABLE, raw
                else:
                    yield row[at_url], row[at_caption], raw
        except (OSError, EOFError, ValueError, pa.ArrowException, *_CORRUPT) as error:
            raise _read_error(source, error) from error
        finally:
            text.close()
    return rows()


def _has_surrogate(value: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in value)


def ingest_table(source: str | Path, data: Path, url_col: str = "url", caption_col: str = "caption",
                 fmt: str | None = None, cfg: IngestConfig = IngestConfig(), force: bool = False) -> IngestResult:
    """Ingest a tsv/csv/parquet table (with a header) whose `url_col` and `caption_col` hold the rows.

    A row that cannot be read (wrong number of fields, bad UTF-8) is a reject, not an error."""
    data = Path(data)
    fmt = _format_of(source, fmt)
    settings = _settings("table", source, cfg, format=fmt, url_col=url_col, caption_col=caption_col)
    if (done := _skip(data, settings, force)) is not None:
        return done
    if fmt == "parquet":  # both open the source and check its columns before anything in DATA changes
        rows = _parquet_rows(source, url_col, caption_col)
    else:
        rows = _text_rows(source, fmt, url_col, caption_col)
    writer = _ShardWriter(data, cfg.shard_size)
    try:
        for url, caption, raw in rows:
            if url is None:  # caption holds the reason
                writer.add(writer.rows, caption, raw)
                continue
            url_s, caption_s = (url or "").strip(), (caption or "").strip()
            writer.add(writer.rows, check_row(url_s, caption_s, cfg.max_caption_chars) or (url_s, caption_s), raw)
        result = writer.close()
    except BaseException:
        writer.discard()
        raise
    return _finish(data, settings, writer.commit(source, result))
