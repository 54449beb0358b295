"""The ingest stage: CC12M TSV and caption tables into captions/ parts and rejects.parquet."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovseg.curation import stage
from ovseg.curation.ingest import IngestConfig, ingest_table, ingest_tsv, split_tsv_line


def _captions(data):
    return pa.concat_tables([pq.read_table(p) for p in stage.parts(data / "captions")])


def _rejects(data):
    return pq.read_table(data / "rejects.parquet")


HAND_MADE = (
    b"https://example.com/a.jpg\tA dog on the beach\n"          # 0 kept
    b"https://example.com/b.jpg\n"                              # 1 no tab
    b"\tcaption without url\n"                                  # 2 empty url
    b"https://example.com/c.jpg\t   \n"                         # 3 empty caption
    b"ftp://example.com/d.jpg\tA cat\n"                         # 4 not http
    b"https://example.com/e.jpg\tCaf\xe9 au lait\n"             # 5 undecodable
    b"https://example.com/f.jpg\t" + b"x" * 50 + b"\n"          # 6 too long (limit 40 below)
    b"HTTP://EXAMPLE.COM/g.jpg\tA red car\r\n"                  # 7 kept, CRLF stripped
    b"https://example.com/h.jpg\ta\tb\n"                        # 8 extra tab
    b"https://example.com/i.jpg\tThe last line has no newline"  # 9 kept
)


def test_tsv_rows_keep_their_row_number_and_rejects_their_reason(tmp_path):
    src = tmp_path / "cc.tsv"
    src.write_bytes(HAND_MADE)
    result = ingest_tsv(src, tmp_path / "data", IngestConfig(shard_size=2, max_caption_chars=40))
    captions = _captions(tmp_path / "data")
    assert captions.column("sample_id").to_pylist() == [0, 7, 9]
    assert captions.column("url").to_pylist()[1] == "HTTP://EXAMPLE.COM/g.jpg"
    assert captions.column("caption").to_pylist() == ["A dog on the beach", "A red car", "The last line has no newline"]
    rejects = _rejects(tmp_path / "data").to_pydict()
    assert dict(zip(rejects["sample_id"], rejects["reason"])) == {
        1: "no_tab", 2: "empty_url", 3: "empty_caption", 4: "not_http_url", 5: "undecodable_utf8",
        6: "caption_too_long", 8: "extra_tab"}
    assert "Caf\\xe9" in rejects["raw"][rejects["sample_id"].index(5)]
    assert (result.rows, result.kept, result.rejected) == (10, 3, 7)
    assert len(stage.parts(tmp_path / "data" / "captions")) == 2  # shard_size 2
    assert captions.schema.field("sample_id").type == pa.int64()


def test_ingest_is_skipped_when_done_and_redone_with_force_or_new_settings(tmp_path):
    src = tmp_path / "cc.tsv"
    src.write_bytes(HAND_MADE)
    data = tmp_path / "data"
    assert not ingest_tsv(src, data).skipped
    assert ingest_tsv(src, data).skipped
    assert not ingest_tsv(src, data, force=True).skipped
    assert len(stage.parts(data / "captions")) == 1
    result = ingest_tsv(src, data, IngestConfig(shard_size=1))
    assert not result.skipped
    assert len(stage.parts(data / "captions")) == result.kept == 4  # one row per part, nothing stale


def test_ingest_reads_a_loopback_http_url(tmp_path, http_root):
    root, base = http_root
    (root / "cc12m.tsv").write_bytes(HAND_MADE)
    result = ingest_tsv(f"{base}/cc12m.tsv", tmp_path / "http", IngestConfig(max_caption_chars=40))
    local = tmp_path / "cc.tsv"
    local.write_bytes(HAND_MADE)
    ingest_tsv(local, tmp_path / "local", IngestConfig(max_caption_chars=40))
    assert result.rows == 10
    assert _captions(tmp_path / "http").equals(_captions(tmp_path / "local"))
    assert _rejects(tmp_path / "http").equals(_rejects(tmp_path / "local"))


def test_missing_source_is_a_stage_error(tmp_path):
    with pytest.raises(stage.StageError, match="cannot open"):
        ingest_tsv(tmp_path / "nope.tsv", tmp_path / "data")


def test_gzipped_tsv_is_decompressed_by_its_name(tmp_path):
    import gzip

    src = tmp_path / "cc.tsv.gz"
    src.write_bytes(gzip.compress(HAND_MADE))
    assert ingest_tsv(src, tmp_path / "data", IngestConfig(max_caption_chars=40)).kept == 3


def test_caption_tables_in_csv_and_parquet_use_the_named_columns(tmp_path):
    rows = {"id": [1, 2, 3], "image": ["https://example.com/1.jpg", "not-a-url", "https://example.com/3.jpg"],
            "text": ["a dog, running", "a cat", None]}
    pq.write_table(pa.table(rows), tmp_path / "t.parquet")
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table(rows), tmp_path / "t.csv")
    for name in ("t.parquet", "t.csv"):
        data = tmp_path / name.replace(".", "_")
        result = ingest_table(tmp_path / name, data, url_col="image", caption_col="text")
        assert (result.rows, result.kept, result.rejected) == (3, 1, 2)
        assert _captions(data).to_pydict() == {"sample_id": [0], "url": ["https://example.com/1.jpg"],
                                               "caption": ["a dog, running"]}
        assert _rejects(data).column("reason").to_pylist() == ["not_http_url", "empty_caption"]


def test_caption_table_without_the_named_column_names_the_columns_it_has(tmp_path):
    pq.write_table(pa.table({"link": ["https://e.com/x.jpg"], "caption": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(stage.StageError, match="no column 'url'.*link"):
        ingest_table(tmp_path / "t.parquet", tmp_path / "data")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda u, c: u + b"\t" + c, st.sampled_from([b"https://e.com/x.jpg", b"http://a", b"", b"x"]),
              st.binary(max_size=40)),
    st.text(max_size=60).map(lambda t: t.encode("utf-8"))), max_size=30).map(lambda ls: b"\n".join(ls)))
@pytest.mark.slow
def test_fuzzed_tsv_bytes_never_crash_and_every_row_is_kept_or_rejected(tmp_path_factory, body):
    data = tmp_path_factory.mktemp("fuzz")
    src = data / "in.tsv"
    src.write_bytes(body)
    expected_rows = body.count(b"\n") + (0 if body.endswith(b"\n") or not body else 1)
    try:
        result = ingest_tsv(src, data / "out", IngestConfig(shard_size=7, max_caption_chars=30))
    except stage.StageError as error:  # a source that keeps no row changes nothing
        assert "holds no row" in str(error) or "was kept" in str(error) or "cannot read" in str(error)
        assert not (data / "out" / "captions").exists() and not (data / "out" / "captions.tmp").exists()
        return
    assert result.rows == expected_rows == result.kept + result.rejected
    kept = _captions(data / "out").column("sample_id").to_pylist()
    rejected = _rejects(data / "out").column("sample_id").to_pylist()
    assert sorted(kept + rejected) == list(range(expected_rows))


def test_split_tsv_line_keeps_inner_spaces_and_strips_edges():
    assert split_tsv_line(b" https://e.com/x.jpg \t  two  words  ", 100) == ("https://e.com/x.jpg", "two  words")
    assert split_tsv_line(b"https://e.com/a b.jpg\tcap", 100) == "not_http_url"
