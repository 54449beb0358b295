"""The manifest, entity_index and pairs stages: DuckDB queries over parsed/ and entities.parquet.

- ``manifest/part-*.parquet``: the samples naming at least one selected entity (the paper's
  "CC4M"), one part per captions part, with ``entities`` and ``chunks`` kept for selected entities.
- ``entity_index.parquet``: one row per (selected entity, manifest sample), sorted by entity.
- ``pairs.parquet``: for each manifest sample up to P partners sharing a selected entity.

Pairs are drawn without a random number generator: each entity's samples are put in a seeded
pseudo-random order (DuckDB's ``hash`` of sample, entity and seed), each sample's entities are
visited in a seeded order too (round-robin), and the t-th partner through an entity is the
sample t places further along that entity's order (wrapping around); the first P distinct
partners are kept. The same seed gives the same pairs, a
partner is never the sample itself, and the work is linear in the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ovseg.curation import stage


@dataclass
class BuildResult:
    rows: int
    skipped: bool = False


def _selected(con, data: Path) -> list[str]:
    rows = con.execute(f"SELECT entity FROM read_parquet({stage.sql_path(data / 'entities.parquet')}) "
                       "WHERE selected ORDER BY rank").fetchall()
    return [r[0] for r in rows]


def _skip(data: Path, name: str, settings: dict, force: bool) -> BuildResult | None:
    if not force and stage.is_done(data, name, settings):
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
    out_dir = stage.reset_dir(data / "manifest")
    con = stage.duckdb_connect(threads, memory_limit)
    selected = _selected(con, data)
    rows = 0
    for captions in stage.parts(data / "captions"):
        parsed = data / "parsed" / captions.name
        tmp = out_dir / (captions.name + ".tmp")
        query = f"""
            SELECT c.sample_id, c.url, c.caption,
                   list_filter(p.entities, lambda e: list_contains($sel, e)) AS entities,
                   list_filter(p.chunks, lambda ch: list_contains($sel, ch.entity)) AS chunks
            FROM read_parquet({stage.sql_path(captions)}) c
            JOIN read_parquet({stage.sql_path(parsed)}) p USING (sample_id)
            WHERE len(list_filter(p.entities, lambda e: list_contains($sel, e))) > 0
            ORDER BY c.sample_id"""
        con.execute(f"COPY ({query}) TO {stage.sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)",
                    {"sel": selected})
        tmp.replace(out_dir / captions.name)
        rows += con.execute(f"SELECT count(*) FROM read_parquet({stage.sql_path(out_dir / captions.name)})").fetchone()[0]
    con.close()
    return _done(data, "manifest", settings, rows)


def build_entity_index(data: Path, force: bool = False, threads: int | None = None,
                       memory_limit: str | None = None) -> BuildResult:
    """entity_index.parquet: (entity, sample_id) of every selected entity of every manifest sample."""
    data = Path(data)
    settings = {"manifest": stage.require(data, "manifest", "entity_index")["settings"]}
    if (done := _skip(data, "entity_index", settings, force)) is not None:
        return done
    con = stage.duckdb_connect(threads, memory_limit)
    out = data / "entity_index.parquet"
    tmp = out.with_name(out.name + ".tmp")
    con.execute(f"""
        COPY (SELECT entity, sample_id
              FROM (SELECT unnest(entities) AS entity, sample_id
                    FROM read_parquet({stage.sql_path(data / 'manifest' / 'part-*.parquet')}))
              ORDER BY entity, sample_id)
        TO {stage.sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)""")
    tmp.replace(out)
    rows = con.execute(f"SELECT count(*) FROM read_parquet({stage.sql_path(out)})").fetchone()[0]
    con.close()
    return _done(data, "entity_index", settings, rows)


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
    con = stage.duckdb_connect(threads, memory_limit)
    index = stage.sql_path(data / "entity_index.parquet")
    p, s = int(pairs_per_sample), int(seed)
    # Position of each sample in its entity's seeded order, and of each entity in its sample's.
    con.execute(f"""
        CREATE TEMP TABLE idx AS
        SELECT entity, sample_id,
               count(*) OVER (PARTITION BY entity) AS n,
               row_number() OVER (PARTITION BY entity ORDER BY hash(sample_id, entity, {s}), sample_id) - 1 AS pos,
               row_number() OVER (PARTITION BY sample_id ORDER BY hash(entity, sample_id, {s} + 1), entity) - 1 AS turn
        FROM read_parquet({index})""")
    # Candidate t of (sample, entity) is the sample t places further along the entity's order;
    # candidates are taken round-robin over the sample's entities (t, then turn), the first P
    # distinct partners kept, so a sample whose entity runs out of partners takes more from another.
    out = data / "pairs.parquet"
    tmp = out.with_name(out.name + ".tmp")
    con.execute(f"""
        COPY (
          WITH steps AS (
            SELECT i.entity, i.sample_id, t, i.turn, (i.pos + t) % i.n AS partner_pos
            FROM idx i, range(1, {p} + 1) r(t)
            WHERE t <= i.n - 1),
          candidates AS (
            SELECT s.sample_id, c.sample_id AS partner_id, s.entity, s.t, s.turn
            FROM steps s JOIN idx c ON c.entity = s.entity AND c.pos = s.partner_pos
            QUALIFY row_number() OVER (PARTITION BY s.sample_id, c.sample_id ORDER BY s.t, s.turn) = 1)
          SELECT sample_id, partner_id, entity
          FROM candidates
          QUALIFY row_number() OVER (PARTITION BY sample_id ORDER BY t, turn) <= {p}
          ORDER BY sample_id, t, turn)
        TO {stage.sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)""")
    tmp.replace(out)
    rows = con.execute(f"SELECT count(*) FROM read_parquet({stage.sql_path(out)})").fetchone()[0]
    con.close()
    return _done(data, "pairs", settings, rows)
