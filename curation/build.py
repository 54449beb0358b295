"""The manifest, entity_index and pairs stages over parsed/, captions/ and entities.parquet.

- ``manifest/part-*.parquet``: the samples naming at least one selected entity (the paper's
  "CC4M"), one part per captions part, with ``entities`` and ``chunks`` kept for selected entities.
- ``entity_index.parquet``: one row per (selected entity, manifest sample), sorted by entity.
- ``pairs.parquet``: for each manifest sample up to P partners sharing a selected entity.

Each manifest part is its captions and parsed parts filtered with Arrow (parts written
concurrently); the entity index is the manifest's entities put in entity order by a stable
counting sort; the pairs are drawn with array lookups (``ovseg.curation.pairs``).

Pairs are drawn without a random number generator: each entity's samples are put in a seeded
pseudo-random order (DuckDB's ``hash`` of sample, entity and seed), each sample's entities are
visited in a seeded order too (round-robin), and the t-th partner through an entity is the
sample t places further along that entity's order (wrapping around); the first P distinct
partners are kept. A sample gets fewer than P partners only when its entities have fewer other
samples (or, rarely, when several of its partners each share two entities with it). The same
seed gives the same pairs, a partner is never the sample itself, and the work is linear in the
index.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovseg.curation import pairs, stage
from ovseg.curation.contract import CAPTIONS_DIR, ENTITIES_FILE, ENTITY_INDEX_FILE, MANIFEST_DIR, PAIRS_FILE, PARSED_DIR


@dataclass
class BuildResult:
    rows: int
    skipped: bool = False


def _selected(con, data: Path) -> list[str]:
    rows = con.execute(f"SELECT entity FROM read_parquet({stage.sql_path(data / ENTITIES_FILE)}) "
                       "WHERE selected ORDER BY rank").fetchall()
    return [r[0] for r in rows]


def _skip(data: Path, name: str, settings: dict, force: bool) -> BuildResult | None:
    if not force and stage.is_done(data, name, settings):
        stage.refresh_catalog(data)
        return BuildResult(stage.read_marker(data, name)["counts"]["rows"], skipped=True)
    stage.start(data, name)
    return None


def _done(data: Path, name: str, settings: dict, rows: int) -> BuildResult:
    stage.finish(data, name, settings, {"rows": rows})
    from ovseg.curation.catalog import build_catalog

    build_catalog(data)
    return BuildResult(rows)


def build_manifest(data: Path, force: bool = False, threads: int | None = None,
                   memory_limit: str | None = None) -> BuildResult:
    """manifest/part-*.parquet: sample_id, url, caption, entities, chunks of samples with a selected entity."""
    data = Path(data)
    settings = {"select": stage.require(data, "select", "manifest")["settings"]}
    if (done := _skip(data, "manifest", settings, force)) is not None:
        return done
    out_dir = stage.reset_dir(data / MANIFEST_DIR)
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill")
    selected = pa.array(_selected(con, data), pa.string())
    con.close()

    def write_part(captions: Path) -> int:
        part = manifest_part(captions, data / PARSED_DIR / captions.name, selected)
        tmp = out_dir / (captions.name + ".tmp")
        pq.write_table(part, tmp, store_schema=False, use_dictionary=[stage.ENTITIES_STRINGS, stage.CHUNKS_ENTITY],
                       **stage.FAST_PARQUET)  # without the Arrow schema, entities read back as strings
        tmp.replace(out_dir / captions.name)
        return part.num_rows

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # parts are independent
        rows = sum(pool.map(write_part, stage.parts(data / CAPTIONS_DIR)))
    return _done(data, "manifest", settings, rows)


def manifest_part(captions: Path, parsed: Path, selected: pa.Array) -> pa.Table:
    """The samples of a captions part and its parsed part (the same samples in the same order,
    docs/schemas.md) that name a selected entity, with only their selected entities. Entities
    are read as the part's dictionary, so each distinct one is looked up once."""
    texts = pq.read_table(captions, columns=["sample_id", "url", "caption"])
    parses = pq.read_table(parsed, columns=["sample_id", "entities", "chunks"],
                           read_dictionary=[stage.ENTITIES_STRINGS, stage.CHUNKS_ENTITY])
    if not texts["sample_id"].equals(parses["sample_id"]):
        raise stage.StageError(f"{captions} and {parsed} do not hold the same samples in the same order")
    entities, n_selected = _only_selected(parses["entities"].combine_chunks(), lambda values: values, selected)
    chunks, _ = _only_selected(parses["chunks"].combine_chunks(), lambda values: values.field("entity"), selected)
    return texts.append_column("entities", entities).append_column("chunks", chunks).filter(n_selected > 0)


def _only_selected(lists: pa.ListArray, entity_of, selected: pa.Array) -> tuple[pa.ListArray, np.ndarray]:
    """`lists` keeping the values whose entity is selected, and each list's new length."""
    values = lists.flatten()
    entity = stage.dictionary_of(entity_of(values))
    keep = pc.is_in(entity.dictionary, value_set=selected).to_numpy(zero_copy_only=False)[entity.indices.to_numpy()]
    lengths = np.bincount(pc.list_parent_indices(lists).to_numpy()[keep], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(offsets, values.filter(keep)), lengths


def build_entity_index(data: Path, force: bool = False, threads: int | None = None,
                       memory_limit: str | None = None) -> BuildResult:
    """entity_index.parquet: (entity, sample_id) of every selected entity of every manifest sample."""
    data = Path(data)
    settings = {"manifest": stage.require(data, "manifest", "entity_index")["settings"]}
    if (done := _skip(data, "entity_index", settings, force)) is not None:
        return done
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill", keep_order=True)
    table = con.sql(f"SELECT sample_id, entities FROM read_parquet({stage.sql_path(data / MANIFEST_DIR / 'part-*.parquet')})"
                    ).to_arrow_table()
    con.close()
    entities = table["entities"].combine_chunks()
    sample_id = table["sample_id"].to_numpy()[pc.list_parent_indices(entities).to_numpy()]
    encoded = pc.dictionary_encode(entities.flatten())
    by_name = pc.sort_indices(encoded.dictionary).to_numpy()  # entity ids in name order
    rank = np.empty(len(by_name), dtype=np.min_scalar_type(max(len(by_name) - 1, 0)))
    rank[by_name] = np.arange(len(by_name))
    entity = rank[encoded.indices.to_numpy()]  # each row's entity as its rank by name
    # Two stable sorts: by sample_id (the parts are in sample order already, so this is a quick
    # check), then by entity (a counting sort over a few thousand entities).
    by_sample = np.argsort(sample_id, kind="stable")
    order = by_sample[np.argsort(entity[by_sample], kind="stable")]
    index = pa.table({"entity": pa.DictionaryArray.from_arrays(entity[order].astype(np.int32),
                                                               encoded.dictionary.take(by_name)),
                      "sample_id": sample_id[order]})
    out = data / ENTITY_INDEX_FILE
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(index, tmp, store_schema=False, use_dictionary=["entity"],  # entity reads back as string
                   column_encoding={"sample_id": "DELTA_BINARY_PACKED"}, **stage.FAST_PARQUET)
    tmp.replace(out)
    return _done(data, "entity_index", settings, index.num_rows)


def build_pairs(data: Path, pairs_per_sample: int = 10, seed: int = 0, force: bool = False,
                threads: int | None = None, memory_limit: str | None = None) -> BuildResult:
    """pairs.parquet: up to `pairs_per_sample` distinct partners per manifest sample, each sharing
    the selected `entity` with it; deterministic in `seed`."""
    data = Path(data)
    if pairs_per_sample < 1:
        raise stage.StageError("--pairs-per-sample must be at least 1")
    settings = {"pairs_per_sample": pairs_per_sample, "seed": seed,
                "entity_index": stage.require(data, "entity_index", "pairs")["settings"]}
    if (done := _skip(data, "pairs", settings, force)) is not None:
        return done
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill", keep_order=True)
    index = pairs.read_seeded_index(con, data / ENTITY_INDEX_FILE, seed, int(pairs_per_sample))
    con.close()
    out = data / PAIRS_FILE
    tmp = out.with_name(out.name + ".tmp")
    rows = pairs.write_pairs(index, int(pairs_per_sample), tmp, PAIR_CHUNK_ROWS, workers=threads or os.cpu_count() or 1)
    tmp.replace(out)
    return _done(data, "pairs", settings, rows)


PAIR_CHUNK_ROWS = 1_000_000  # index rows per range of samples in the pairs stage
