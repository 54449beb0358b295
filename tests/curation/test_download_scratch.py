"""A download leaves nothing in the temporary folder: W&B, which img2dataset imports in every
pool process, makes `tmp*wandb-*` folders that pool processes never remove."""

import pytest

from ovseg.curation import synthetic as syn
from ovseg.curation.download import DownloadConfig, download
from ovseg.curation.ingest import IngestConfig
from ovseg.curation.pipeline import CurateConfig, curate
from ovseg.curation.select import SelectConfig
from ovseg.curation.serve import serve


@pytest.mark.slow
def test_download_leaves_no_temporary_folders(tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the download's processes inherit it
    world = syn.generate(tmp_path / "world", syn.WorldConfig(n_train=12, n_val=0, n_test=0, image_size=32, seed=3))
    data = tmp_path / "data"
    with serve(world) as server:
        syn.write_captions_tsv(world, server.url)
        curate(data, CurateConfig(source=f"{server.url}/captions.tsv", ingest=IngestConfig(shard_size=100),
                                  select=SelectConfig(top_k=len(syn.SHAPES)), pairs_per_sample=2, threads=1))
        result = download(data, DownloadConfig(image_size=32, resize_mode="no", processes=2, threads=4,
                                               shard_size=4), progress=False)
    assert result.counts.get("success", 0) > 0, result.counts
    left = sorted(p.name for p in temp.iterdir())
    assert not left, left
