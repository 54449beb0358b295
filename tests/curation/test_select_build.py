"""select, manifest, entity_index and pairs on hand-made parsed tables with known answers."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg.curation import build, contract, stage
from ovseg.curation.catalog import TABLES, build_catalog
from ovseg.curation.contract import CAPTIONS_SCHEMA, PARSED_SCHEMA
from ovseg.curation.select import SelectConfig, default_stoplist, select

# sample_id -> entities (chunks get one span per entity)
SAMPLES = {
    0: ["dog", "ball", "photo"],
    1: ["dog", "cat"],
    2: ["cat"],
    3: ["dog"],
    4: ["car", "photo"],
    5: ["photo"],
    6: ["tree", "dog"],
    7: ["cat", "tree"],
    8: [],
}


def make_parsed(data, samples=SAMPLES, per_part=4):
    """captions/ and parsed/ parts for `samples`, marked as ingested and parsed."""
    ids = sorted(samples)
    for index, start in enumerate(range(0, len(ids), per_part)):
        chunk = ids[start:start + per_part]
        captions = [" and ".join(samples[i]) or "nothing" for i in chunk]
        stage.write_parquet_atomic(pa.table([chunk, [f"https://e.com/{i}.jpg" for i in chunk], captions],
                                            schema=CAPTIONS_SCHEMA), data / "captions" / stage.part_name(index))
        spans = []
        for i in chunk:
            spans.append([{"start": 6 * k, "end": 6 * k + len(e), "entity": e} for k, e in enumerate(samples[i])])
        stage.write_parquet_atomic(pa.table([chunk, [samples[i] for i in chunk], spans], schema=PARSED_SCHEMA),
                                   data / "parsed" / stage.part_name(index))
    stage.finish(data, "ingest", {"hand": "made"}, {})
    stage.finish(data, "parse", {"hand": "made"}, {})
    return data


def _entities(data):
    table = pq.read_table(data / "entities.parquet").to_pylist()
    return {row["entity"]: row for row in table}


def test_select_counts_ranks_and_gives_each_left_out_entity_its_reason(tmp_path):
    data = make_parsed(tmp_path)
    result = select(data, SelectConfig(top_k=2, stoplist=("photo",)))
    rows = _entities(data)
    assert {e: (r["n_samples"], r["rank"]) for e, r in rows.items()} == {
        "dog": (4, 1), "cat": (3, 2), "photo": (3, 3), "tree": (2, 4), "ball": (1, 5), "car": (1, 6)}
    assert [e for e, r in rows.items() if r["selected"]] == ["dog", "cat"]
    assert rows["photo"]["excluded_reason"] == "stoplist"
    assert rows["tree"]["excluded_reason"] == "below_top_k"
    assert rows["dog"]["excluded_reason"] is None
    assert (result.entities, result.selected) == (6, 2)


def test_n_mentions_counts_every_chunk_not_only_distinct_samples(tmp_path):
    data = tmp_path
    make_parsed(data, {0: ["dog"], 1: ["dog"]})
    spans = [[{"start": 0, "end": 3, "entity": "dog"}, {"start": 8, "end": 12, "entity": "dog"}], [{"start": 0, "end": 3, "entity": "dog"}]]
    stage.write_parquet_atomic(pa.table([[0, 1], [["dog"], ["dog"]], spans], schema=PARSED_SCHEMA),
                               data / "parsed" / stage.part_name(0))
    select(data, SelectConfig(top_k=5, stoplist=()))
    assert (_entities(data)["dog"]["n_samples"], _entities(data)["dog"]["n_mentions"]) == (2, 3)


def test_vocabulary_selects_exactly_its_words_and_reports_missing_ones(tmp_path):
    data = make_parsed(tmp_path)
    result = select(data, SelectConfig(top_k=None, vocabulary=("tree", "car", "zebra"), stoplist=()))
    rows = _entities(data)
    assert sorted(e for e, r in rows.items() if r["selected"]) == ["car", "tree"]
    assert rows["dog"]["excluded_reason"] == "not_in_vocabulary"
    assert result.missing_vocabulary == ["zebra"]


def test_stoplist_files_extend_or_replace_the_default(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("# mine\nDog\n\n")
    extended = SelectConfig.from_files(top_k=3, stoplist_add=[extra])
    assert "dog" in extended.stoplist and "photo" in extended.stoplist
    replaced = SelectConfig.from_files(top_k=3, stoplist=extra)
    assert replaced.stoplist == ("dog",)
    assert {"photo", "image", "illustration", "background", "view"} <= set(default_stoplist())
    with pytest.raises(stage.StageError, match="cannot read"):
        SelectConfig.from_files(stoplist=tmp_path / "missing.txt")


def _built(data, p=3, seed=0):
    select(data, SelectConfig(top_k=3, stoplist=("photo",)))
    build.build_manifest(data, threads=1)
    build.build_entity_index(data, threads=1)
    build.build_pairs(data, p, seed, threads=1)
    manifest = pa.concat_tables([pq.read_table(p) for p in stage.parts(data / "manifest")])
    return manifest, pq.read_table(data / "entity_index.parquet"), pq.read_table(data / "pairs.parquet")


def test_manifest_keeps_samples_with_a_selected_entity_and_only_selected_entities(tmp_path):
    manifest, index, _ = _built(make_parsed(tmp_path))
    # selected: dog, cat, tree
    assert manifest.column("sample_id").to_pylist() == [0, 1, 2, 3, 6, 7]
    assert manifest.column("entities").to_pylist() == [["dog"], ["dog", "cat"], ["cat"], ["dog"], ["tree", "dog"], ["cat", "tree"]]
    assert [[c["entity"] for c in cs] for cs in manifest.column("chunks").to_pylist()][0] == ["dog"]
    assert manifest.column("url").to_pylist()[0] == "https://e.com/0.jpg"
    assert index.to_pylist() == sorted(
        ({"entity": e, "sample_id": s} for s, es in zip(manifest.column("sample_id").to_pylist(),
                                                      manifest.column("entities").to_pylist()) for e in es),
        key=lambda r: (r["entity"], r["sample_id"]))


def test_the_stages_tables_read_back_in_the_contracts_schemas(tmp_path):
    """What select, manifest, entity_index and pairs write is what ovseg.curation.contract says
    (the schemas training and the contract writer use), column for column and type for type."""
    data = make_parsed(tmp_path / "D")
    manifest, index, pairs = _built(data)
    assert manifest.schema == contract.MANIFEST_SCHEMA
    assert index.schema == contract.ENTITY_INDEX_SCHEMA and pairs.schema == contract.PAIRS_SCHEMA
    entities = pq.read_table(data / contract.ENTITIES_FILE).schema  # DuckDB marks some columns not null
    assert [(f.name, f.type) for f in entities] == [(f.name, f.type) for f in contract.ENTITIES_SCHEMA]


def test_pairs_share_a_selected_entity_are_distinct_and_never_the_sample_itself(tmp_path):
    _, index, pairs = _built(make_parsed(tmp_path), p=3)
    members = defaultdict(set)
    for row in index.to_pylist():
        members[row["entity"]].add(row["sample_id"])
    by_sample = defaultdict(list)
    for row in pairs.to_pylist():
        assert row["sample_id"] != row["partner_id"]
        assert {row["sample_id"], row["partner_id"]} <= members[row["entity"]]
        by_sample[row["sample_id"]].append(row["partner_id"])
    for sample, partners in by_sample.items():
        assert len(partners) == len(set(partners)) <= 3
        possible = set().union(*(members[e] for e in members if sample in members[e])) - {sample}
        assert len(partners) == min(3, len(possible))  # as many as the shared entities allow
    assert set(by_sample) == set(index.column("sample_id").to_pylist())


def test_pairs_are_the_same_for_the_same_seed_and_differ_for_another(tmp_path):
    samples = {i: ["dog", "cat", "tree"][: 1 + i % 3] for i in range(200)}
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        runs.append(_built(make_parsed(tmp_path / name, samples, per_part=64), p=10, seed=seed)[2])
    assert runs[0].equals(runs[1])
    assert not runs[0].equals(runs[2])
    assert runs[0].num_rows == runs[2].num_rows == 200 * 10


def test_a_stage_rerun_with_new_settings_invalidates_the_later_stages(tmp_path):
    data = make_parsed(tmp_path)
    _built(data)
    assert build.build_pairs(data, 3, 0).skipped
    select(data, SelectConfig(top_k=1, stoplist=("photo",)))
    assert stage.read_marker(data, "manifest") is None and stage.read_marker(data, "pairs") is None
    with pytest.raises(stage.StageError, match="manifest"):
        build.build_entity_index(data)


def test_catalog_has_a_view_per_existing_table(tmp_path):
    import duckdb

    data = make_parsed(tmp_path)
    _built(data)
    build_catalog(data)
    con = duckdb.connect(str(data / "catalog.duckdb"), read_only=True)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert views == {"captions", "parsed", "entities", "manifest", "entity_index", "pairs"}
    assert set(views) <= set(TABLES)
    assert con.execute("SELECT count(*) FROM entity_index WHERE entity = 'dog'").fetchone()[0] == 4


def test_pairs_done_in_many_sample_ranges_equal_pairs_done_in_one(tmp_path, monkeypatch):
    samples = {i: ["dog", "cat", "tree", "car"][i % 4: i % 4 + 1 + i % 3] for i in range(300)}
    one = _built(make_parsed(tmp_path / "one", samples, per_part=100), p=5, seed=1)[2]
    monkeypatch.setattr(build, "PAIR_CHUNK_ROWS", 37)
    many = _built(make_parsed(tmp_path / "many", samples, per_part=100), p=5, seed=1)[2]
    assert many.equals(one) and one.num_rows > 1000


def _pairs_by_the_rule(index, p, seed):
    """pairs.parquet's rule (docs/pipeline.md) spelled out sample by sample, with DuckDB's hash."""
    import math

    import duckdb

    rows = duckdb.connect().execute(
        f"SELECT entity, sample_id, hash(sample_id, entity, {seed}), hash(entity, sample_id, {seed} + 1) FROM index"
    ).fetchall()
    members, entities_of = defaultdict(list), defaultdict(list)
    for entity, sample, member_hash, turn_hash in rows:
        members[entity].append((member_hash, sample))
        entities_of[sample].append((turn_hash, entity))
    order = {e: [s for _, s in sorted(ms)] for e, ms in members.items()}
    place = {(e, s): i for e, samples in order.items() for i, s in enumerate(samples)}
    pairs = []
    for sample in sorted(entities_of):
        turns = [e for _, e in sorted(entities_of[sample])]
        n = {e: len(order[e]) for e in turns}
        limit = p
        if len(turns) > 1 and min(n.values()) - 1 >= math.ceil(p / len(turns)) + 1:
            limit = math.ceil(p / len(turns)) + 1
        drawn = []
        for t in range(1, min(limit, p) + 1):
            for e in turns:
                partner = order[e][(place[e, sample] + t) % n[e]]
                if t < n[e] and partner not in [d[1] for d in drawn] and len(drawn) < p:
                    drawn.append((sample, partner, e))
        pairs += drawn
    return pa.table({"sample_id": pa.array([r[0] for r in pairs], pa.int64()),
                     "partner_id": pa.array([r[1] for r in pairs], pa.int64()), "entity": [r[2] for r in pairs]})


@pytest.mark.parametrize("p, seed", [(1, 0), (3, 5), (10, 2)])
def test_pairs_follow_the_documented_rule_exactly(tmp_path, monkeypatch, p, seed):
    # Entities of very different sizes: car and lamp have exactly ceil(P/2) + 1 samples for P = 10
    # and 3 (so their two-entity samples sit on the edge of the rule), kite a single one; samples
    # have one to five entities (sample 15); drawn in several ranges of samples.
    members = {"dog": range(80), "cat": range(0, 120, 3), "tree": range(1, 120, 7), "car": (5, 15, 50, 95, 101, 110),
               "lamp": (7, 60, 85), "kite": (40,), "boat": (15, *range(100, 120))}
    samples = {i: [e for e, ms in members.items() if i in ms] for i in range(120)}
    assert samples[5] == ["dog", "car"] and samples[7] == ["dog", "lamp"] and len(samples[15]) == 5
    data = make_parsed(tmp_path, samples, per_part=50)
    select(data, SelectConfig(top_k=7, stoplist=()))
    build.build_manifest(data, threads=2)
    build.build_entity_index(data, threads=2)
    monkeypatch.setattr(build, "PAIR_CHUNK_ROWS", 29)
    build.build_pairs(data, p, seed, threads=2)
    index = pq.read_table(data / "entity_index.parquet")
    assert pq.read_table(data / "pairs.parquet").equals(_pairs_by_the_rule(index, p, seed))


def test_manifest_refuses_captions_and_parsed_parts_that_hold_different_samples(tmp_path):
    data = make_parsed(tmp_path)
    parsed = data / "parsed" / stage.part_name(1)
    table = pq.read_table(parsed)
    pq.write_table(table.set_column(0, "sample_id", pa.array([i + 100 for i in table["sample_id"].to_pylist()])), parsed)
    select(data, SelectConfig(top_k=3, stoplist=("photo",)))
    with pytest.raises(stage.StageError, match="same samples"):
        build.build_manifest(data)
