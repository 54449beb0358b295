"""`ovseg curate` caption commands and `ovseg sql` through Typer's runner."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from ovseg.cli.main import app

from .conftest import SAMPLE_TSV

runner = CliRunner()


def test_cc12m_command_on_the_bundled_sample_reports_every_stage(tmp_path, nlp):
    data = tmp_path / "data"
    result = runner.invoke(app, ["curate", "cc12m", str(data), "--source", str(SAMPLE_TSV), "--workers", "1",
                                 "--top-k-entities", "15", "--pairs-per-sample", "4", "--threads", "1", "--no-download"])
    assert result.exit_code == 0, result.output
    for name in ("ingest:", "parse:", "select: 15 of", "manifest:", "entity_index:", "pairs:"):
        assert name in result.output
    pairs = pq.read_table(data / "pairs.parquet")
    assert max(pq.read_table(data / "pairs.parquet").group_by("sample_id").aggregate([("partner_id", "count")])
               .column("partner_id_count").to_pylist()) == 4 and pairs.num_rows > 0
    again = runner.invoke(app, ["curate", "select", str(data), "--top-k-entities", "15"])
    assert "already done, skipped" in again.output


def test_stage_commands_run_one_by_one_and_vocabulary_selects_it(tmp_path, nlp):
    data = tmp_path / "data"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\ncat\nunicorn\n")
    steps = [["ingest", str(data), "--source", str(SAMPLE_TSV)], ["parse", str(data), "--workers", "1"],
             ["select", str(data), "--vocabulary", str(vocab)], ["manifest", str(data), "--seed", "3"]]
    outputs = []
    for step in steps:
        result = runner.invoke(app, ["curate", *step])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "not in the data: unicorn" in outputs[2]
    selected = {r["entity"] for r in pq.read_table(data / "entities.parquet").to_pylist() if r["selected"]}
    assert selected == {"dog", "cat"}


def test_captions_command_reads_a_csv_with_named_columns(tmp_path):
    src = tmp_path / "caps.csv"
    src.write_text('image_url,text\nhttps://e.com/1.jpg,"A dog, on a mat"\nftp://e.com/2.jpg,a cat\n')
    result = runner.invoke(app, ["curate", "captions", str(src), str(tmp_path / "d"), "--url-col", "image_url",
                                 "--caption-col", "text"])
    assert result.exit_code == 0, result.output
    assert "2 rows: 1 kept, 1 rejected (1 not_http_url)" in result.output


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    missing = runner.invoke(app, ["curate", "parse", str(tmp_path / "empty")])
    assert missing.exit_code == 2 and "needs the ingest stage" in missing.output
    no_source = runner.invoke(app, ["curate", "ingest", str(tmp_path / "d"), "--source", str(tmp_path / "x.tsv")])
    assert no_source.exit_code == 2 and "cannot open caption source" in no_source.output
    bad_stoplist = runner.invoke(app, ["curate", "select", str(tmp_path), "--stoplist", str(tmp_path / "none.txt")])
    assert bad_stoplist.exit_code == 2 and "cannot read word list" in bad_stoplist.output
    for result in (missing, no_source, bad_stoplist):
        assert "Traceback" not in result.output


def test_sql_prints_a_table_and_writes_csv_json_and_parquet(curated_sample, tmp_path):
    query = "SELECT entity, n_samples FROM entities WHERE selected ORDER BY rank LIMIT 3"
    table = runner.invoke(app, ["sql", query, "--data", str(curated_sample)])
    assert table.exit_code == 0, table.output
    assert "person" in table.output and "n_samples" in table.output
    csv_out = runner.invoke(app, ["sql", query, "--data", str(curated_sample), "--format", "csv"])
    lines = csv_out.output.strip().splitlines()
    assert lines[0] == "entity,n_samples" and len(lines) == 4 and lines[1].startswith("person,")
    out = tmp_path / "r.json"
    assert runner.invoke(app, ["sql", query, "--data", str(curated_sample), "-f", "json", "-o", str(out)]).exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["entity"] for r in rows] == [l.split(",")[0] for l in lines[1:]]
    pq_out = tmp_path / "r.parquet"
    assert runner.invoke(app, ["sql", query, "--data", str(curated_sample), "-f", "parquet", "-o", str(pq_out)]).exit_code == 0
    assert pq.read_table(pq_out).column("entity").to_pylist() == [r["entity"] for r in rows]


def test_sql_bad_query_prints_duckdbs_message_and_exits_1(curated_sample):
    result = runner.invoke(app, ["sql", "SELECT * FROM no_such_table", "--data", str(curated_sample)])
    assert result.exit_code == 1
    assert "no_such_table does not exist" in result.output and "Traceback" not in result.output


def test_sql_is_read_only(curated_sample):
    result = runner.invoke(app, ["sql", "CREATE TABLE x AS SELECT 1", "--data", str(curated_sample)])
    assert result.exit_code == 1 and "read-only" in result.output
    assert runner.invoke(app, ["sql", "SELECT count(*) FROM entities", "--data", str(curated_sample)]).exit_code == 0


def test_sql_on_a_missing_data_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["sql", "SELECT 1", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no data folder" in result.output
