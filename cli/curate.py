"""`ovseg curate ...`: the curation stages (docs/pipeline.md)."""

import typer

app = typer.Typer(help="Curate caption data into a manifest, entity index and pairs; download images.", no_args_is_help=True)


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
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        _fail("synthetic", f"--base-url must be an http(s) URL, not {base_url!r}")
    if serve_it and (parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port):
        _fail("synthetic", "--serve needs a --base-url on 127.0.0.1 with a port, e.g. http://127.0.0.1:8000")

    from ovseg.curation import synthetic as syn

    cfg = syn.WorldConfig(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)
    syn.generate(out, cfg, force=force, base_url=base_url)
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


def run_download(data: _Path, image_size: int, processes: int, threads: int, resize_mode: str,
                 distributor: str, shard_size: int = 10_000, timeout: float = 10.0, retries: int = 0,
                 max_image_area: _Optional[float] = None, force: bool = False, command: str = "download") -> None:
    """The download step, shared by `ovseg curate download` and `ovseg curate cc12m`."""
    import math

    from ovseg.curation.download import DownloadConfig, DownloadError, download

    cfg = DownloadConfig(image_size=image_size, resize_mode=resize_mode, processes=processes, threads=threads,
                         shard_size=shard_size, timeout=timeout, retries=retries, distributor=distributor,
                         max_image_area=math.inf if max_image_area is None else max_image_area)
    try:
        result = download(data, cfg, force=force)
    except (DownloadError, ValueError) as error:
        _fail(command, str(error))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    if result.skipped:
        typer.echo(f"download already complete ({counts}); --force to download again")
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
    run_download(data, image_size, processes, threads, resize_mode, distributor, shard_size, timeout, retries,
                 max_image_area, force)
