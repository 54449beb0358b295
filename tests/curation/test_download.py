"""The download stage against the loopback server: img2dataset really downloads, every manifest
row gets exactly one downloads row with the right status, images read back by offset are the
served pictures, a killed download resumes without fetching finished shards again, and nothing
leaves loopback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.curation import synthetic as syn
from ovseg.curation.contract import MANIFEST_SCHEMA, read_member
from ovseg.curation.download import DownloadConfig, DownloadError, download, read_image, read_image_bytes
from ovseg.curation.serve import serve

pytestmark = pytest.mark.slow

N_IMAGES = 80

# Imported by every Python process of the download (PYTHONPATH): records and refuses any
# connection or name lookup that is not loopback.
GUARD = '''
import os, socket
_LOG = os.environ["OVSEG_TEST_NET_LOG"]
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
def _note(what):
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {what}\\n")
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
        _note(f"connect {address!r}")
        raise OSError("test guard: no traffic beyond loopback")
    return _connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOOPBACK:
        _note(f"connect_ex {address!r}")
        return 111
    return _connect_ex(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host not in _LOOPBACK and host is not None:
        _note(f"getaddrinfo {host!r}")
        raise socket.gaierror("test guard: no lookups beyond loopback")
    return _getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return syn.generate(tmp_path_factory.mktemp("world"), syn.WorldConfig(n_train=N_IMAGES, n_val=0, n_test=0, seed=1))


@pytest.fixture(scope="module")
def net_guard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guard")
    (folder / "sitecustomize.py").write_text(GUARD)
    log = folder / "net.log"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OVSEG_TEST_NET_LOG")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), saved["PYTHONPATH"]]))
    os.environ["OVSEG_TEST_NET_LOG"] = str(log)
    yield log
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_manifest(data: Path, urls: list[str], first_id: int = 0, step: int = 3) -> list[int]:
    """A manifest as the curation stages write it (DESIGN.md section 2)."""
    (data / "manifest").mkdir(parents=True, exist_ok=True)
    ids = list(range(first_id, first_id + step * len(urls), step))
    table = pa.table({
        "sample_id": ids, "url": urls, "caption": [f"a red circle number {i}" for i in ids],
        "entities": [["circle"]] * len(ids), "chunks": [[{"start": 0, "end": 12, "entity": "circle"}]] * len(ids),
    }, schema=MANIFEST_SCHEMA)
    half = len(ids) // 2  # two parts, written out of order: the stage must sort by sample_id
    pq.write_table(table.slice(half), data / "manifest" / "part-00000.parquet")
    pq.write_table(table.slice(0, half), data / "manifest" / "part-00001.parquet")
    return ids


FAILURES = {  # test route -> expected (status, words in the error message)
    "/_status/404/gone.jpg": ("failed_to_download", "404"),
    "/_slow/4/images/000001.jpg": ("failed_to_download", "timed out"),
    "/_bytes/500/notanimage.jpg": ("failed_to_resize", "decod"),
    "/_large/1200x1000.png": ("failed_to_resize", "too large"),
}


@pytest.fixture(scope="module")
def downloaded(world, net_guard, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with serve(world, test_routes=True) as server:
        files = [f for f, _ in syn.captions(world)]
        urls = [server.url_for(f) for f in files]
        urls += [server.url + path for path in FAILURES]
        urls += [server.url + "/_redirect/images/000005.jpg"]
        ids = write_manifest(data, urls)
        cfg = DownloadConfig(image_size=32, resize_mode="border", processes=1, threads=8, shard_size=30,
                             timeout=1.5, max_image_area=1000 * 1000)
        result = download(data, cfg, progress=False)
        yield {"data": data, "ids": ids, "urls": urls, "files": files, "result": result,
               "table": pq.read_table(data / "downloads.parquet"), "server": server, "cfg": cfg}


def test_every_manifest_row_has_exactly_one_downloads_row(downloaded):
    table = downloaded["table"]
    assert table["sample_id"].to_pylist() == downloaded["ids"]  # sorted, unique, complete
    for column in ("sample_id", "status", "error_message", "shard", "offset", "size", "width", "height"):
        assert column in table.column_names
    assert downloaded["result"].counts == {"success": N_IMAGES + 1, "failed_to_download": 2, "failed_to_resize": 2}
    # Each finished shard's rows are kept, so a resumed run reads only new shards' tar headers.
    cached = sorted((downloaded["data"] / ".download" / "shards").glob("*.parquet"))
    assert len(cached) == downloaded["result"].shards == 3
    assert pa.concat_tables(pq.read_table(p) for p in cached).sort_by("sample_id").equals(table)


def test_failures_get_img2dataset_status_and_message(downloaded):
    rows = {r["sample_id"]: r for r in downloaded["table"].to_pylist()}
    for sample_id, url in zip(downloaded["ids"], downloaded["urls"]):
        row = rows[sample_id]
        route = url.split(":", 2)[2].split("/", 1)[1]
        expected = FAILURES.get("/" + route)
        if expected is None:
            assert row["status"] == "success", (url, row)
            assert row["width"] == row["height"] == 32 and row["offset"] > 0 and row["size"] > 0
        else:
            assert row["status"] == expected[0], (url, row)
            assert expected[1] in row["error_message"].lower(), (url, row)
            assert row["offset"] is None and row["size"] is None


def _served(world, file):
    with Image.open(world / file) as image:
        return np.asarray(image.convert("RGB").resize((32, 32), Image.BOX), dtype=float)


def _blocks(images):
    n, h, w, c = images.shape
    return images.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))


def test_every_image_read_back_by_offset_is_the_served_picture_resized(downloaded, world):
    data, files = downloaded["data"], downloaded["files"]
    served = np.stack([_served(world, f) for f in files])
    success = [r for r in downloaded["table"].to_pylist() if r["status"] == "success"]
    for row in success:
        shard = str(data / "images" / row["shard"])
        with Image.open(__import__("io").BytesIO(read_member(shard, row["offset"], row["size"]))) as image:
            got = np.asarray(image.convert("RGB"), dtype=float)
        assert got.shape == (32, 32, 3)
        index = downloaded["ids"].index(row["sample_id"])
        url = downloaded["urls"][index]
        expected = 5 if "_redirect" in url else index  # the redirect lands on images/000005.jpg
        # Compared in 4x4 blocks: the JPEG re-encoding (chroma subsampling) smears fine textures.
        distances = np.abs(_blocks(served) - _blocks(got[None])).mean(axis=(1, 2, 3))
        assert distances[expected] < 6, (row, distances[expected])
        assert int(np.argmin(distances)) == expected  # its own picture, not a neighbour's
        assert distances[expected] < 0.5 * np.partition(distances, 1)[1]
    assert np.array_equal(np.asarray(read_image(data, success[0]["sample_id"])), np.asarray(
        Image.open(__import__("io").BytesIO(read_image_bytes(data, success[0]["sample_id"]))).convert("RGB")))


def test_read_image_over_http_reads_one_range_of_the_shard(downloaded):
    data = downloaded["data"]
    sample_id = downloaded["ids"][7]
    local = read_image_bytes(data, sample_id)
    with serve(data) as server:
        assert read_image_bytes(server.url, sample_id) == local
        row = next(r for r in downloaded["table"].to_pylist() if r["sample_id"] == sample_id)
        tar_size = (data / "images" / row["shard"]).stat().st_size
        assert row["size"] < tar_size  # one member, not the whole shard
    with pytest.raises(KeyError, match="did not download"):
        read_image_bytes(data, downloaded["ids"][N_IMAGES])  # the 404


def test_nothing_leaves_loopback_during_a_download(downloaded, net_guard):
    assert net_guard.exists() is False or net_guard.read_text() == "", net_guard.read_text()
    log = (downloaded["data"] / ".download" / "img2dataset.log").read_text()
    assert "Starting the downloading" in log  # the guard was in place for a real run


def test_a_finished_download_is_skipped_and_the_cli_says_so(downloaded):
    requests = sum(downloaded["server"].requests.values())
    args = ["curate", "download", str(downloaded["data"]), "--image-size", "32", "--resize-mode", "border",
            "--shard-size", "30"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "max_image_area 1000000.0 -> inf" in result.output  # the option that differs
    result = CliRunner().invoke(app, [*args, "--max-image-area", "1000000"])
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    assert sum(downloaded["server"].requests.values()) == requests


def test_a_changed_manifest_is_refused_without_force(downloaded, tmp_path):
    import shutil

    data = tmp_path / "data"
    write_manifest(data, ["http://127.0.0.1:9/a.jpg"])
    for sub in ("images", ".download"):
        shutil.copytree(downloaded["data"] / sub, data / sub)
    result = CliRunner().invoke(app, ["curate", "download", str(data), "--image-size", "32",
                                      "--resize-mode", "border", "--shard-size", "30"])
    assert result.exit_code == 2, result.output
    assert "--force" in result.output and "Traceback" not in result.output


def test_cli_reports_a_missing_manifest_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["curate", "download", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["curate", "download", str(tmp_path), "--resize-mode", "squash"])
    assert result.exit_code == 2


def test_bad_options_are_refused_before_anything_runs(tmp_path):
    write_manifest(tmp_path, ["http://127.0.0.1:9/a.jpg"])
    for args in (["--resize-mode", "squash"], ["--distributor", "dask"], ["--threads", "0"]):
        result = CliRunner().invoke(app, ["curate", "download", str(tmp_path), *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "images").exists()
    import importlib.util

    for distributor in ("pyspark", "ray"):  # passed through to img2dataset; their packages are optional
        if importlib.util.find_spec(distributor) is None:
            result = CliRunner().invoke(app, ["curate", "download", str(tmp_path), "--distributor", distributor])
            assert result.exit_code == 2 and f"pip install {distributor}" in result.output


def test_killed_download_resumes_only_unfinished_shards(world, net_guard, tmp_path):
    data = tmp_path / "data"
    shard_size, n = 10, 60
    with serve(world, delay=0.12) as server:
        files = [f for f, _ in syn.captions(world)][:n]
        write_manifest(data, [server.url_for(f) for f in files])
        args = ["curate", "download", str(data), "--image-size", "32", "--processes", "1", "--threads", "2",
                "--shard-size", str(shard_size), "--resize-mode", "border"]
        child = subprocess.Popen([sys.executable, "-m", "ovseg.cli.main", *args], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while len(list((data / "images").glob("*_stats.json"))) < 2:
                assert child.poll() is None, "the download ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            os.killpg(child.pid, signal.SIGKILL)  # the CLI, img2dataset and its workers
            child.wait()
        finished = sorted(int(p.name[:5]) for p in (data / "images").glob("*_stats.json"))
        assert 2 <= len(finished) < n // shard_size, finished
        assert not (data / "downloads.parquet").exists()
        before = dict(server.requests)
        # a kill can land while img2dataset writes a stats file (its last write of a shard whose
        # data is complete): the resumed run's progress bar must not trip over the empty file
        (data / "images" / f"{finished[-1]:05d}_stats.json").write_text("")

        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output

        table = pq.read_table(data / "downloads.parquet")
        assert table.num_rows == n and len(set(table["sample_id"].to_pylist())) == n
        assert set(table["status"].to_pylist()) == {"success"}
        for shard in finished:  # images of finished shards were fetched once, before the kill
            for f in files[shard * shard_size:(shard + 1) * shard_size]:
                assert server.requests["/" + f] == 1 == before.get("/" + f), f
        refetched = sum(server.requests[f"/{f}"] - 1 for f in files)
        assert refetched <= (n // shard_size - len(finished)) * shard_size
        # Each sample is in the shards exactly once (no duplicate downloads on disk).
        import tarfile

        keys = []
        for tar in sorted((data / "images").glob("*.tar")):
            with tarfile.open(tar) as t:
                keys += [m.name for m in t if m.name.endswith(".jpg")]
        assert len(keys) == len(set(keys)) == n
    assert net_guard.exists() is False or net_guard.read_text() == ""


def test_samples_of_an_unfinished_shard_are_reported_not_downloaded(downloaded, tmp_path):
    import shutil

    from ovseg.curation.download import join_downloads, read_manifest_urls

    images = tmp_path / "images"
    shutil.copytree(downloaded["data"] / "images", images)
    (images / "00001_stats.json").unlink()  # as if killed while writing shard 1
    table = join_downloads(read_manifest_urls(downloaded["data"]), images, downloaded["cfg"])
    assert table["sample_id"].to_pylist() == downloaded["ids"]
    status = table["status"].to_pylist()
    shard_size = downloaded["cfg"].shard_size
    assert set(status[shard_size:2 * shard_size]) == {"not_downloaded"}
    assert "not_downloaded" not in status[:shard_size] + status[2 * shard_size:]


def test_img2dataset_stops_when_the_command_that_started_it_is_killed(world, tmp_path):
    from ovseg.curation.download import _exclusive

    data = tmp_path / "data"
    with serve(world, delay=3) as server:  # 40 images x 3 s / 2 threads: a minute left to run
        write_manifest(data, [server.url_for(f) for f, _ in syn.captions(world)][:40])
        child = subprocess.Popen([sys.executable, "-m", "ovseg.cli.main", "curate", "download", str(data),
                                  "--processes", "1", "--threads", "2", "--shard-size", "10", "--image-size", "32"],
                                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while server.requests.total() == 0:  # img2dataset is downloading
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            child.kill()  # only the command, not its process group
            child.wait()
            deadline = time.monotonic() + 12
            while _group_alive(child.pid):
                assert time.monotonic() < deadline, "img2dataset outlived the command that started it"
                time.sleep(0.2)
        finally:
            if _group_alive(child.pid):
                os.killpg(child.pid, signal.SIGKILL)
    assert not list((data / "images").glob("*_stats.json"))
    with _exclusive(data / ".download"):  # the lock died with the command: a rerun may start
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("tar_format", ["pax", "gnu", "ustar"])
def test_member_offsets_from_headers_match_the_tarfile_module(tmp_path, tar_format):
    import io
    import tarfile

    from ovseg.curation.download import _member_offsets_tarfile, member_offsets

    fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[tar_format]
    path = tmp_path / "shard.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(30):
            # long names need pax or GNU headers; ustar keeps them short (with a prefix field)
            stem = f"{i:09d}" if tar_format == "ustar" or i % 3 else "x" * 120 + f"{i:09d}"
            stem = f"dir/{stem}" if i % 5 == 0 else stem
            for ext, n in (("jpg", int(rng.integers(0, 3000))), ("txt", 7), ("json", 511)):
                info = tarfile.TarInfo(f"{stem}.{ext}")
                info.size, info.mtime = n, 1.7e9 + i / 7  # float mtime: webdataset's pax headers
                tar.addfile(info, io.BytesIO(bytes(rng.integers(0, 256, n, dtype=np.uint8))))
    expected = _member_offsets_tarfile(str(path), ".jpg")
    assert len(expected) == 30
    assert member_offsets(str(path), "jpg") == expected



def test_a_new_manifest_restarts_the_download_when_asked(downloaded, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(downloaded["data"], data)
    table = pq.read_table(data / "manifest")
    shutil.rmtree(data / "manifest")
    (data / "manifest").mkdir()
    pq.write_table(table.sort_by("sample_id").slice(0, 5), data / "manifest" / "part-00000.parquet")
    with pytest.raises(DownloadError, match="different manifest"):
        download(data, downloaded["cfg"], progress=False)
    result = download(data, downloaded["cfg"], progress=False, new_manifest_restarts=True)
    assert not result.skipped and sum(result.counts.values()) == 5
    assert pq.read_table(data / "downloads.parquet")["sample_id"].to_pylist() == downloaded["ids"][:5]
    assert download(data, downloaded["cfg"], progress=False, new_manifest_restarts=True).skipped
