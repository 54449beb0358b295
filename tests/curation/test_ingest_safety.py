"""A bad source never destroys finished work; odd rows become rejects (issue 26 items 3, 14; issue 30 item 2)."""

from __future__ import annotations

import gzip
import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ovseg.cli.main import app
from ovseg.curation import stage
from ovseg.curation.ingest import IngestConfig, ingest_table, ingest_tsv

runner = CliRunner()
ROWS = b"".join(b"https://e.com/%d.jpg\ta dog number %d\n" % (i, i) for i in range(20))


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def done(tmp_path):
    """A DATA whose ingest completed (with a later stage's marker standing in for finished work)."""
    src = tmp_path / "good.tsv"
    src.write_bytes(ROWS)
    data = tmp_path / "data"
    ingest_tsv(src, data, IngestConfig(shard_size=7))
    stage.finish(data, "parse", {"stand-in": True}, {})
    return data


@pytest.mark.parametrize("make", ["missing", "empty", "all_rejected"])
def test_a_bad_tsv_source_leaves_finished_work_and_markers_alone(done, tmp_path, make):
    before = _digest(done)
    src = tmp_path / f"{make}.tsv"
    if make == "empty":
        src.write_bytes(b"")
    elif make == "all_rejected":
        src.write_bytes(b"no tab here\nftp://x\tcap\n")
    result = runner.invoke(app, ["curate", "ingest", str(done), "--source", str(src), "--shard-size", "7"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _digest(done) == before


def test_a_table_without_the_url_column_leaves_finished_work_alone(done, tmp_path):
    before = _digest(done)
    src = tmp_path / "caps.csv"
    src.write_text("link,caption\nhttps://e.com/1.jpg,a cat\n")
    result = runner.invoke(app, ["curate", "captions", str(src), str(done)])
    assert result.exit_code == 2 and "no column 'url'" in result.output and "Traceback" not in result.output
    assert _digest(done) == before


def test_one_bad_row_of_a_table_is_a_reject_not_an_abort(tmp_path):
    src = tmp_path / "caps.tsv"
    src.write_bytes(b"url\tcaption\nhttps://e.com/0.jpg\ta dog\nhttps://e.com/1.jpg\ta\tcat\n"
                    b"https://e.com/2.jpg\ta \xff bird\nhttps://e.com/3.jpg\ta fish\n")
    result = ingest_table(src, tmp_path / "data")
    assert (result.rows, result.kept, result.rejected) == (4, 2, 2)
    assert result.reasons == {"undecodable_utf8": 1, "wrong_field_count": 1}
    kept = pq.read_table(tmp_path / "data" / "captions").column("sample_id").to_pylist()
    assert kept == [0, 3]


def test_a_url_without_host_and_a_caption_with_nul_are_rejected(tmp_path):
    src = tmp_path / "cc.tsv"
    src.write_bytes(b"https:///x.jpg\ta dog\nhttps://e.com/1.jpg\ta \x00 cat\nhttps://e.com/2.jpg\ta bird\n")
    result = ingest_tsv(src, tmp_path / "data")
    assert result.kept == 1 and result.reasons == {"not_http_url": 1, "nul_character": 1}


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bz2"])
def test_compressed_sources_are_read_whatever_their_name(tmp_path, kind):
    if kind == "gzip":
        body = gzip.compress(ROWS)
    elif kind == "bz2":
        import bz2

        body = bz2.compress(ROWS)
    else:
        out = pa.BufferOutputStream()
        with pa.CompressedOutputStream(out, "zstd") as f:
            f.write(ROWS)
        body = out.getvalue().to_pybytes()
    for name in ("cc.tsv", f"cc.tsv.{'zst' if kind == 'zstd' else kind}"):
        src = tmp_path / name
        src.write_bytes(body)
        result = ingest_tsv(src, tmp_path / name.replace(".", "_"))
        assert (result.kept, result.rejected) == (20, 0), (name, result)


def test_a_zst_caption_table_is_read(tmp_path):
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, "zstd") as f:
        f.write(b"url,caption\nhttps://e.com/1.jpg,a cat\n")
    src = tmp_path / "caps.csv.zst"
    src.write_bytes(out.getvalue().to_pybytes())
    assert ingest_table(src, tmp_path / "data").kept == 1


@pytest.mark.parametrize("magic", [b"\xfd7zXZ\x00", b"\x1f\x8b\x08\x00"], ids=["xz", "gzip"])
def test_a_corrupt_compressed_source_is_a_one_line_read_error_not_a_crash(tmp_path, magic):
    """A source whose first bytes say xz or gzip but whose stream is corrupt: lzma and zlib
    raise their own errors (not OSError), which once escaped as a traceback."""
    src = tmp_path / "in.tsv"
    src.write_bytes(magic + bytes(range(256)) * 4)
    with pytest.raises(stage.StageError, match="cannot read caption source"):
        ingest_tsv(src, tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out" / "captions").exists()
