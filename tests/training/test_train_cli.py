"""`ovseg train` on data made by the real chain: the synthetic world served on loopback, curated
(ingest, spaCy parse, DuckDB select, pairs) and downloaded by img2dataset. Training reads only
the on-disk contract; curation is imported here only to build the data."""

import json
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from ovseg.cli.main import app


# Each test needs data made end to end (a curated, downloaded or demo folder): minutes, not seconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    from ovseg.curation.download import DownloadConfig, download
    from ovseg.curation.pipeline import CurateConfig, curate
    from ovseg.curation.select import SelectConfig
    from ovseg.curation.serve import serve
    from ovseg.curation.synthetic import SHAPES, WorldConfig, generate, write_captions_tsv

    root = tmp_path_factory.mktemp("curated")
    world = generate(root / "world", WorldConfig(n_train=60, n_val=0, n_test=0, image_size=32, seed=2))
    data = root / "data"
    with serve(world) as server:
        write_captions_tsv(world, server.url)
        curate(data, CurateConfig(source=f"{server.url}/captions.tsv", select=SelectConfig(top_k=len(SHAPES)),
                                  pairs_per_sample=4, seed=2))
        result = download(data, DownloadConfig(image_size=32, resize_mode="no", processes=1, threads=8,
                                               shard_size=50))
    assert result.counts.get("success", 0) > 20, result.counts
    return data


def _train(*args):
    return CliRunner().invoke(app, ["train", "--preset", "test", "--no-progress", *args])


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_both_stages_train_on_curated_and_downloaded_data(curated, tmp_path):
    run = tmp_path / "run"
    result = _train("--data", str(curated), "--run", str(run), "train.stages.1.steps=3", "train.stages.2.steps=2")
    assert result.exit_code == 0, result.output
    stage1, stage2 = _records(run / "stage1"), _records(run / "stage2")
    assert [r["step"] for r in stage1] == [1, 2, 3] and [r["step"] for r in stage2] == [1, 2]
    assert all(r["skipped"] == 0 for r in stage1 + stage2)
    assert "loss/mask" in stage2[-1] and torch.isfinite(torch.tensor(stage2[-1]["loss/loss"]))
    state = torch.load(run / "stage2" / "last.pt", weights_only=True)
    assert state["stage"] == 2 and state["config"]["data"]["data_dir"] == str(curated)


def test_stage2_from_init_then_resumes_its_own_run(curated, tmp_path):
    first = tmp_path / "s1"
    assert _train("--data", str(curated), "--run", str(first), "--stage", "1", "train.stages.1.steps=2").exit_code == 0
    second = tmp_path / "s2"
    ok = _train("--data", str(curated), "--run", str(second), "--stage", "2", "--init", str(first / "last.pt"),
                "train.stages.2.steps=2")
    assert ok.exit_code == 0, ok.output
    more = _train("--data", str(curated), "--run", str(second), "--stage", "2", "train.stages.2.steps=3")
    assert more.exit_code == 0, more.output
    assert [r["step"] for r in _records(second)] == [1, 2, 3]  # resumed at 2, not started over


def test_a_corrupt_member_of_a_downloaded_shard_is_skipped_and_counted(curated, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(curated, data)
    downloads = pq.read_table(data / "downloads.parquet")
    ok = downloads.filter(pc.equal(downloads["status"], "success")).sort_by("sample_id").to_pylist()
    victim = ok[0]
    with open(data / "images" / victim["shard"], "r+b") as f:  # garbage of the same size, in place
        f.seek(victim["offset"])
        f.write(b"\0" * victim["size"])
    from ovseg.training.config import resolve
    from ovseg.training.data import CaptionImageDataset, captions_for_tokenizer, collate, load_samples
    from ovseg.training.tokenizer import train_wordpiece

    cfg = resolve("test")
    tokenizer = train_wordpiece(captions_for_tokenizer(str(data)), vocab_size=300)
    dataset = CaptionImageDataset(load_samples(str(data)), tokenizer, 32, cfg.train.stages[0], cfg.data, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate(items)
    assert batch["n_skipped"] == 1 and batch["image"].shape[0] == len(ok) - 1
    assert victim["sample_id"] not in batch["sample_id"].tolist()
    # and through the CLI the run goes on, counting it in metrics.jsonl
    run = tmp_path / "run"
    result = _train("--data", str(data), "--run", str(run), "--stage", "1", f"train.stages.1.steps={len(ok) // 4}")
    assert result.exit_code == 0, result.output
    last = _records(run)[-1]
    assert last["epoch"] == 0 and last["skipped"] <= 1 and last["step"] == len(ok) // 4
