"""img2dataset's many-machine distributors run for real on the loopback world: Spark in local mode
and Ray in local mode each give the `downloads` table that multiprocessing gives (issue 26 item 16).

Their packages come with the optional extra: `pip install -e '.[dist]'` (Spark also needs Java 17+).
Without them these tests are skipped."""

from __future__ import annotations

import importlib.util
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ovseg.curation import synthetic as syn
from ovseg.curation.download import DownloadConfig, download, read_image_bytes
from ovseg.curation.serve import serve

from .test_download import write_manifest


def _download(world, data, distributor):
    with serve(world) as server:
        urls = [server.url_for(f) for f, _ in syn.captions(world)] + [server.url + "/nope/404.jpg"]
        write_manifest(data, urls)
        cfg = DownloadConfig(image_size=32, resize_mode="border", processes=2, threads=4, shard_size=15,
                             timeout=5, distributor=distributor)
        result = download(data, cfg, progress=False)
    return result, pq.read_table(data / "downloads.parquet")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    world = syn.generate(root / "world", syn.WorldConfig(n_train=40, n_val=0, n_test=0, seed=1))
    result, table = _download(world, root / "mp", "multiprocessing")
    assert result.complete and result.counts == {"success": 40, "failed_to_download": 1}
    return world, root, table


def _java() -> bool:
    return shutil.which("java") is not None


@pytest.mark.slow
@pytest.mark.parametrize("distributor", ["pyspark", "ray"])
def test_a_distributor_gives_the_downloads_table_of_multiprocessing(reference, distributor):
    if importlib.util.find_spec(distributor) is None:
        pytest.skip(f"{distributor} is not installed (pip install -e '.[dist]')")
    if distributor == "pyspark" and not _java():
        pytest.skip("Spark needs Java 17 or later")
    world, root, expected = reference
    data = root / distributor
    result, table = _download(world, data, distributor)
    assert result.complete
    # Members of a tar come in the order their downloads finished: every column but `offset`
    # is the same, and the bytes at each offset are the same image.
    assert table.drop_columns(["offset"]).equals(expected.drop_columns(["offset"]))
    for row in table.filter(pc.equal(table["status"], "success")).to_pylist():
        assert read_image_bytes(data, row["sample_id"]) == read_image_bytes(root / "mp", row["sample_id"])
