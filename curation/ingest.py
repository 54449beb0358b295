"""The ingest stage: a caption source into ``DATA/captions/part-*.parquet`` and ``DATA/rejects.parquet``.

Sources are read through fsspec, so a local path, ``http(s)://``, ``s3://``, ``gs://`` ... all
work (and ``.gz``/``.bz2``/``.xz``/``.zst`` are decompressed by name). Two kinds:

- CC12M's TSV: ``url<TAB>caption`` per line, no header (:func:`ingest_tsv`);
- any tsv/csv/parquet table with named url and caption columns (:func:`ingest_table`).

``sample_id`` is the 0-based row number in the source, so it is stable across runs and machines.
Every source row ends up in exactly one of captions/ and rejects.parquet, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from ovseg.curation import stage

log = logging.getLogger(__name__)

CC12M_URL = "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"

CAPTIONS_SCHEMA = pa.schema([("sample_id", pa.int64()), ("url", pa.string()), ("caption", pa.string())])
REJECTS_SCHEMA = pa.schema([("sample_id", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])

# Reasons a source row is rejected (the `reason` column of rejects.parquet).
NO_TAB = "no_tab"
EXTRA_TAB = "extra_tab"
EMPTY_URL = "empty_url"
EMPTY_CAPTION = "empty_caption"
BAD_URL = "not_http_url"
UNDECODABLE = "undecodable_utf8"
TOO_LONG = "caption_too_long"

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
    if len(caption) > max_caption_chars:
        return TOO_LONG
    return None


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
        self.folder = stage.reset_dir(Path(data) / "captions")
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
        stage.write_parquet_atomic(rejects, self.data / "rejects.parquet")
        reasons: dict[str, int] = {}
        for reason in self.rejects["reason"]:
            reasons[reason] = reasons.get(reason, 0) + 1
        return IngestResult(self.rows, self.kept, len(self.rejects["reason"]), dict(sorted(reasons.items())))


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
    return IngestResult(counts["rows"], counts["kept"], counts["rejected"], counts["reasons"], skipped=True)


def _finish(data: Path, settings: dict, result: IngestResult) -> IngestResult:
    assert result.rows == result.kept + result.rejected
    stage.finish(data, "ingest", settings, {"rows": result.rows, "kept": result.kept,
                                            "rejected": result.rejected, "reasons": result.reasons})
    from ovseg.curation.catalog import build_catalog

    build_catalog(data)
    return result


def ingest_tsv(source: str | Path, data: Path, cfg: IngestConfig = IngestConfig(), force: bool = False) -> IngestResult:
    """Ingest CC12M's TSV (``url<TAB>caption`` per line, no header) from a path or fsspec URL."""
    import fsspec

    data = Path(data)
    settings = _settings("tsv", source, cfg)
    if (done := _skip(data, settings, force)) is not None:
        return done
    stage.start(data, "ingest")
    writer = _ShardWriter(data, cfg.shard_size)
    try:
        opened = fsspec.open(str(source), "rb", compression="infer")
        f = opened.open()
    except (FileNotFoundError, OSError, ValueError) as error:
        raise stage.StageError(f"cannot open caption source {source}: {error}") from error
    try:
        size = getattr(f, "size", None)
        total = size if isinstance(size, int) else None
        with _progress(total, "ingest") as bar:
            sample_id = 0
            pending = b""
            while True:
                block = f.read(8 << 20)
                if not block:
                    break
                bar.update(len(block))
                lines = (pending + block).split(b"\n")
                pending = lines.pop()
                for raw in lines:
                    writer.add(sample_id, split_tsv_line(raw, cfg.max_caption_chars),
                               raw.decode("utf-8", errors="backslashreplace"))
                    sample_id += 1
            if pending:  # a last line without a newline is still a row
                writer.add(sample_id, split_tsv_line(pending, cfg.max_caption_chars),
                           pending.decode("utf-8", errors="backslashreplace"))
    finally:
        f.close()
    return _finish(data, settings, writer.close())


def ingest_table(source: str | Path, data: Path, url_col: str = "url", caption_col: str = "caption",
                 fmt: str | None = None, cfg: IngestConfig = IngestConfig(), force: bool = False) -> IngestResult:
    """Ingest a tsv/csv/parquet table (with a header) whose `url_col` and `caption_col` hold the rows."""
    import fsspec
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = Path(data)
    name = str(source).lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    fmt = fmt or next((f for f in ("parquet", "tsv", "csv") if name.endswith("." + f)), None)
    if fmt not in ("parquet", "tsv", "csv"):
        raise stage.StageError(f"cannot tell the format of {source}; pass --format tsv, csv or parquet")
    settings = _settings("table", source, cfg, format=fmt, url_col=url_col, caption_col=caption_col)
    if (done := _skip(data, settings, force)) is not None:
        return done
    stage.start(data, "ingest")
    try:
        with fsspec.open(str(source), "rb", compression=None if fmt == "parquet" else "infer") as f:
            if fmt == "parquet":
                table = pq.read_table(f)
            else:
                table = pacsv.read_csv(
                    f, parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                                        newlines_in_values=fmt == "csv"),
                    convert_options=pacsv.ConvertOptions(column_types={url_col: pa.string(), caption_col: pa.string()},
                                                         include_columns=[url_col, caption_col]))
    except (FileNotFoundError, OSError, ValueError, pa.ArrowInvalid) as error:
        raise stage.StageError(f"cannot read {source} as {fmt}: {error}") from error
    missing = [c for c in (url_col, caption_col) if c not in table.column_names]
    if missing:
        raise stage.StageError(f"{source} has no column {', '.join(map(repr, missing))} "
                               f"(columns: {', '.join(table.column_names)}); use --url-col/--caption-col")
    writer = _ShardWriter(data, cfg.shard_size)
    for batch in table.select([url_col, caption_col]).to_batches(max_chunksize=65536):
        urls, captions = batch.column(0).cast(pa.string()).to_pylist(), batch.column(1).cast(pa.string()).to_pylist()
        for url, caption in zip(urls, captions):
            url_s, caption_s = (url or "").strip(), (caption or "").strip()
            result = check_row(url_s, caption_s, cfg.max_caption_chars) or (url_s, caption_s)
            writer.add(writer.rows, result, f"{url}\t{caption}")
    return _finish(data, settings, writer.close())
