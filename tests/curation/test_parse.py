"""The parse stage: noun chunks, entities, <PERSON>, spans, and parsed/ parts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg.curation import parse as parse_mod
from ovseg.curation import stage
from ovseg.curation.ingest import IngestConfig, ingest_tsv


def test_known_caption_gives_its_chunks_and_root_lemmas(nlp):
    caption = "Two dogs playing with a red ball on the grass."
    [(entities, chunks)] = parse_mod.parse_with(nlp, [caption])
    assert entities == ["dog", "ball", "grass"]
    assert [caption[c["start"]:c["end"]] for c in chunks] == ["Two dogs", "a red ball", "the grass"]


def test_pronouns_and_numbers_are_not_entities(nlp):
    [(entities, _)] = parse_mod.parse_with(nlp, ["She gave it to them, all 5 of them."])
    assert entities == []


def test_person_placeholder_is_the_entity_person_with_spans_of_the_original(nlp):
    caption = "<PERSON> and <PERSON> with a dog at the premiere"
    [(entities, chunks)] = parse_mod.parse_with(nlp, [caption])
    assert entities == ["person", "dog", "premiere"]
    assert [caption[c["start"]:c["end"]] for c in chunks][:2] == ["<PERSON>", "<PERSON>"]


def test_entities_are_unique_in_caption_order_and_lower_cased(nlp):
    [(entities, chunks)] = parse_mod.parse_with(nlp, ["Two dogs chase a Cat while the dog sleeps."])
    assert entities == ["dog", "cat"]
    assert [c["entity"] for c in chunks] == ["dog", "cat", "dog"]


def test_only_the_pipes_noun_chunks_need_are_loaded(nlp):
    assert "ner" not in nlp.pipe_names
    assert set(nlp.pipe_names) <= set(parse_mod.NEEDED_PIPES)


def test_model_setting_env_var_wins_and_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(parse_mod.MODEL_ENV, "no_such_model_xyz")
    assert parse_mod.default_model() == "no_such_model_xyz"
    with pytest.raises(stage.StageError, match="no_such_model_xyz"):
        parse_mod.load_nlp()


def test_no_installed_model_says_how_to_install_one(monkeypatch):
    monkeypatch.delenv(parse_mod.MODEL_ENV, raising=False)
    monkeypatch.setattr(parse_mod, "KNOWN_MODELS", ("no_such_model_a", "no_such_model_b"))
    with pytest.raises(stage.StageError, match="pip install"):
        parse_mod.default_model()


def test_parse_stage_writes_one_part_per_captions_part_matching_the_library(tmp_path, nlp):
    src = tmp_path / "cc.tsv"
    captions = ["A cat on a sofa", "Two red cars in the street", "<PERSON> holding a guitar", "It is here"]
    src.write_text("".join(f"https://e.com/{i}.jpg\t{c}\n" for i, c in enumerate(captions)))
    data = tmp_path / "data"
    ingest_tsv(src, data, IngestConfig(shard_size=3))
    result = parse_mod.parse(data, workers=1)
    assert (result.samples, result.parts) == (4, 2)
    parsed = pa.concat_tables([pq.read_table(p) for p in stage.parts(data / "parsed")])
    assert parsed.schema.equals(parse_mod.PARSED_SCHEMA)
    assert parsed.column("sample_id").to_pylist() == [0, 1, 2, 3]
    assert parsed.column("entities").to_pylist() == [e for e, _ in parse_mod.parse_with(nlp, captions)]
    assert parsed.column("entities").to_pylist()[2] == ["person", "guitar"]
    assert parse_mod.parse(data, workers=1).skipped


def test_parse_needs_ingest_first(tmp_path):
    with pytest.raises(stage.StageError, match="ingest"):
        parse_mod.parse(tmp_path)


def test_fewer_parts_than_workers_are_parsed_in_slices_that_keep_every_worker_busy():
    assert parse_mod.plan_slices([6000], 2) == [[(0, 3000), (3000, 6000)]]
    assert parse_mod.plan_slices([6000, 10], 4) == [[(0, 3000), (3000, 6000)], [(0, 10)]]
    assert parse_mod.plan_slices([100, 100, 100], 2) == [[(0, 100)]] * 3
    assert parse_mod.plan_slices([700], 8) == [[(0, 700)]]  # slices of fewer than 500 rows are not worth a worker


@pytest.mark.slow
def test_one_part_parsed_by_two_workers_equals_one_worker(tmp_path, monkeypatch):
    src = tmp_path / "cc.tsv"
    src.write_text("".join(f"https://e.com/{i}.jpg\t{['a red dog', 'two cats on a mat', '<PERSON> with a car'][i % 3]} {i}\n"
                           for i in range(1200)))
    one, two = tmp_path / "one", tmp_path / "two"
    for data in (one, two):
        ingest_tsv(src, data)
    parse_mod.parse(one, workers=1)
    parse_mod.parse(two, workers=2)
    assert [p.name for p in stage.parts(two / "parsed")] == ["part-00000.parquet"]
    assert pq.read_table(two / "parsed").equals(pq.read_table(one / "parsed"))
