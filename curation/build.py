"""The manifest, entity_index and pairs stages: DuckDB queries over parsed/ and entities.parquet.

- ``manifest/part-*.parquet``: the samples naming at least one selected entity (the paper's
  "CC4M"), one part per captions part, with ``entities`` and ``chunks`` kept for selected entities.
- ``entity_index.parquet``: one row per (selected entity, manifest sample), sorted by entity.
- ``pairs.parquet``: for each manifest sample up to P partners sharing a selected entity.

Pairs are drawn without a random number generator: each entity's samples are put in a seeded
pseudo-random order (DuckDB's ``hash`` of sample, entity and seed), each sample's entities are
visited in a seeded order too (round-robin), and the t-th partner through an entity is the
sample t places further along that entity's order (wrapping around); the first P distinct
partners are kept. A sample gets fewer than P partners only when its entities have fewer other
samples (or, rarely, when several of its partners each share two entities with it). The same seed gives the same pairs, a
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
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill")
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
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill")
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
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill")
    index = stage.sql_path(data / "entity_index.parquet")
    p, s = int(pairs_per_sample), int(seed)
    # Entities as small integers, with the start (base) of each entity's block of positions.
    con.execute(f"""
        CREATE TEMP TABLE ents AS
        SELECT entity, (row_number() OVER (ORDER BY entity) - 1)::INTEGER AS eid, n,
               (sum(n) OVER (ORDER BY entity) - n)::BIGINT AS base
        FROM (SELECT entity, count(*) AS n FROM read_parquet({index}) GROUP BY entity)""")
    # Position of each sample in its entity's seeded order (pos), of each entity in its sample's
    # (turn), and g = base + pos, the global position a partner is looked up by.
    con.execute(f"""
        CREATE TEMP TABLE idx AS
        SELECT i.sample_id, e.eid, e.n, e.base,
               row_number() OVER (PARTITION BY e.eid ORDER BY hash(i.sample_id, i.entity, {s}), i.sample_id) - 1 AS pos,
               (row_number() OVER (PARTITION BY i.sample_id ORDER BY hash(i.entity, i.sample_id, {s} + 1), i.entity) - 1)::TINYINT AS turn,
               (count(*) OVER (PARTITION BY i.sample_id))::SMALLINT AS k
        FROM read_parquet({index}) i JOIN ents e USING (entity)""")
    con.execute("CREATE TEMP TABLE members AS SELECT base + pos AS g, sample_id FROM idx")
    ranges = con.execute(f"""
        SELECT min(sample_id), max(sample_id) FROM (
          SELECT sample_id, ntile({max(1, _pair_chunks(con))}) OVER (ORDER BY sample_id) AS chunk
          FROM (SELECT DISTINCT sample_id FROM idx)) GROUP BY chunk ORDER BY 1""").fetchall()
    # Candidate t of (sample, entity) is the sample t places further along the entity's order
    # (wrapping around; t < n so never the sample itself), ranked by key = (t, turn): round-robin
    # over the sample's entities. A sample with one entity takes t = 1..P directly. A sample with
    # k > 1 entities takes t up to ceil(P/k) + 1 when every entity has that many partners, else up
    # to P, drops repeated partners (keeping the first), and keeps the first P. Samples are done
    # in ranges of sample_id, so each range's sort is small and the output is written in order.
    steps = f"""
        CREATE OR REPLACE TEMP TABLE steps AS
        WITH mine AS (SELECT * FROM idx WHERE sample_id BETWEEN $lo AND $hi),
        per AS (SELECT sample_id, min(n) AS min_n FROM mine WHERE k > 1 GROUP BY sample_id)
        SELECT i.sample_id, i.eid, i.k, t * 64 + i.turn AS key, i.base + (i.pos + t) % i.n AS partner_g
        FROM mine i LEFT JOIN per USING (sample_id), range(1, {p} + 1) r(t)
        WHERE t <= i.n - 1
          AND (i.k = 1 OR t <= CASE WHEN per.min_n - 1 >= ({p} + i.k - 1) // i.k + 1
                                    THEN ({p} + i.k - 1) // i.k + 1 ELSE {p} END)"""
    candidates = """
        CREATE OR REPLACE TEMP TABLE candidates AS
        SELECT s.sample_id, m.sample_id AS partner_id, s.eid, s.key, s.k
        FROM steps s JOIN members m ON m.g = s.partner_g"""
    query = f"""
        WITH several AS (
          SELECT sample_id, partner_id, arg_min(eid, key) AS eid, min(key) AS key
          FROM candidates WHERE k > 1 GROUP BY sample_id, partner_id
          QUALIFY row_number() OVER (PARTITION BY sample_id ORDER BY min(key)) <= {p})
        SELECT c.sample_id, c.partner_id, e.entity FROM (
          SELECT sample_id, partner_id, eid, key FROM candidates WHERE k = 1
          UNION ALL
          SELECT sample_id, partner_id, eid, key FROM several) c JOIN ents e USING (eid)
        ORDER BY c.sample_id, c.key"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("sample_id", pa.int64()), ("partner_id", pa.int64()), ("entity", pa.string())])
    out = data / "pairs.parquet"
    tmp = out.with_name(out.name + ".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for lo, hi in ranges:
            con.execute(steps, {"lo": lo, "hi": hi})
            con.execute(candidates)
            table = con.sql(query).to_arrow_table().cast(schema)
            writer.write_table(table, row_group_size=1 << 20)
            rows += table.num_rows
    tmp.replace(out)
    con.close()
    return _done(data, "pairs", settings, rows)


PAIR_CHUNK_ROWS = 1_000_000  # index rows per range of samples in the pairs stage


def _pair_chunks(con) -> int:
    return -(-con.execute("SELECT count(*) FROM idx").fetchone()[0] // PAIR_CHUNK_ROWS)
