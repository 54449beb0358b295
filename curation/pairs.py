"""Drawing ``pairs.parquet`` from the entity index with array lookups instead of joins.

The rule (docs/pipeline.md), stated over positions and computed over positions:

- each entity's n samples are put in a seeded pseudo-random order (DuckDB's
  ``hash(sample_id, entity, seed)``, ties by sample_id);
- each sample's entities are visited in a seeded order too (``hash(entity, sample_id, seed + 1)``,
  ties by entity): an entity's ``turn``;
- the t-th candidate of (sample, entity) is the sample t places further along the entity's order,
  wrapping around (t < n, so never the sample itself); a sample's candidates are ranked by
  (t, turn), round-robin over its entities;
- a sample with one entity takes t = 1..P; a sample with k > 1 entities takes t up to
  ceil(P/k) + 1 when each of its entities has that many other samples (else up to P), drops
  repeated partners (keeping the first) and keeps the first P.

The orders are laid out in a ``ring``: each entity's samples in their order followed by its
first P again, so a sample's candidates through an entity are the P values after its own place.
The work is two sorts of the index, then one pass over the candidates per range of samples;
ranges are drawn in threads and appended to the Parquet file in order.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.lib.stride_tricks import sliding_window_view

from ovseg.curation import stage
from ovseg.curation.contract import PAIRS_SCHEMA

# The contract's pairs schema with the entity column written from its dictionary (entity ids);
# it reads back as string.
WRITE_SCHEMA = PAIRS_SCHEMA.set(PAIRS_SCHEMA.get_field_index("entity"),
                                pa.field("entity", pa.dictionary(pa.int32(), pa.string())))
ROW_GROUP_ROWS = 1 << 20
# sample_id repeats and grows, partner_id is a random id: delta encoding stores each in about as
# many bits as it varies by, in less time than dictionaries or a compressor would take.
ENCODINGS = {"sample_id": "DELTA_BINARY_PACKED", "partner_id": "DELTA_BINARY_PACKED"}


@dataclass
class SeededIndex:
    """The entity index's rows in sample order (by sample_id, then turn), and the ring they look
    their partners up in."""

    entities: pa.Array      # (E,) entity names, sorted; eid indexes them
    n: np.ndarray           # (E,) samples of each entity
    ring: np.ndarray        # (G + E*P,) each entity's samples in its seeded order, then its first P again
    sample_id: np.ndarray   # (G,) each row's sample
    eid: np.ndarray         # (G,) each row's entity
    at: np.ndarray          # (G,) each row's place in the ring: its t-th candidate is ring[at + t]
    starts: np.ndarray      # (S + 1,) first row of each sample, then G


def read_seeded_index(con, index: Path, seed: int, p: int) -> SeededIndex:
    """entity_index.parquet (sorted by entity, then sample_id) in the orders of `seed`, with a
    ring for up to `p` candidates per entity; `con` must keep insertion order, so that rows
    come back in the file's order."""
    s = int(seed)
    table = con.sql(f"""
        SELECT entity, sample_id, hash(sample_id, entity, {s}) AS member_hash,
               hash(entity, sample_id, {s} + 1) AS turn_hash
        FROM read_parquet({stage.sql_path(index)})""").to_arrow_table()
    entity = pc.dictionary_encode(table["entity"]).combine_chunks()
    eid = entity.indices.to_numpy()
    if np.any(eid[1:] < eid[:-1]):  # dictionary ids are in first-seen order: sorted iff blocks are
        raise stage.StageError(f"{index} is not sorted by entity (run the entity_index stage again)")
    sample_id = table["sample_id"].to_numpy()
    member_hash = table["member_hash"].to_numpy()
    turn_hash = table["turn_hash"].to_numpy()
    del table

    # Member order: each entity's block (already by sample_id) sorted stably by its hash.
    n = np.bincount(eid, minlength=len(entity.dictionary)).astype(np.int64)
    base = np.cumsum(n) - n
    by_member = np.empty(len(eid), dtype=np.int64)
    for start, stop in zip(base.tolist(), (base + n).tolist()):
        by_member[start:stop] = start + np.argsort(member_hash[start:stop], kind="stable")
    del member_hash
    # The ring: block e moves p places right per earlier block, and its first p members (cycling
    # when it has fewer) follow it, so the samples t = 1..p places further along are consecutive.
    ring_base = base + p * np.arange(len(n))
    in_ring = np.arange(len(eid)) + np.repeat(ring_base - base, n)
    ring = np.empty(len(eid) + p * len(n), dtype=np.int64)
    ring[in_ring] = sample_id[by_member]
    ahead = np.arange(p)
    ring[(ring_base + n)[:, None] + ahead] = ring[ring_base[:, None] + ahead % n[:, None]]
    at = np.empty_like(in_ring)
    at[by_member] = in_ring
    del by_member, in_ring

    # Sample order: a stable sort by sample_id (a sample's rows stay in entity order), then each
    # sample's rows put in turn order.
    by_sample = np.argsort(sample_id, kind="stable")
    sample_id = sample_id[by_sample]
    starts = np.append(np.flatnonzero(np.diff(sample_id, prepend=-1)), len(sample_id))
    first = np.repeat(starts[:-1], np.diff(starts))
    turn = _rank_in_group(turn_hash[by_sample], first)
    del turn_hash
    by_turn = np.empty_like(by_sample)
    by_turn[first + turn] = by_sample
    return SeededIndex(entities=entity.dictionary, n=n, ring=ring, sample_id=sample_id,
                       eid=eid[by_turn], at=at[by_turn], starts=starts)


def _rank_in_group(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each row's rank by value (ties by row order) among the rows of its group, the groups
    being runs of rows that share `first` (their group's first row). Groups are small (a
    sample's entities), so rows are compared with the next d rows, d = 1, 2, ..."""
    rank = np.zeros(len(values), dtype=np.int64)
    group_rows = np.arange(len(values)) - first + 1
    for d in range(1, int(group_rows.max(initial=1))):
        same = first[d:] == first[:-d]
        earlier, later = values[:-d], values[d:]
        rank[d:] += same & (earlier <= later)
        rank[:-d] += same & (later < earlier)
    return rank


def draw_pairs(index: SeededIndex, p: int, lo: int, hi: int) -> pa.Table:
    """The pairs of samples lo..hi-1 (in sample order), sorted by sample_id, then draw order.

    Samples with the same number k of entities are drawn together as (m, T, k) arrays: candidate
    t of the sample's j-th entity (in turn order) at [:, t - 1, j], so a row of the (m, T*k)
    reshape lists a sample's candidates in draw order."""
    first = index.starts[lo:hi]
    k = np.diff(index.starts[lo:hi + 1])
    drawn = []  # (samples, partner, eid, keep, rank) of each group of samples with k entities
    counts = np.zeros(hi - lo, dtype=np.int64)
    for k_ in np.unique(k).tolist():
        samples = np.flatnonzero(k == k_)
        m = len(samples)
        rows = first[samples, None] + np.arange(k_)                          # (m, k) in turn order
        eid = index.eid[rows]
        n = index.n[eid]
        limit = np.full(m, p)
        if k_ > 1:
            step = -(-p // k_) + 1
            limit[n.min(axis=1) - 1 >= step] = min(step, p)
        last = np.minimum(limit[:, None], n - 1)                             # (m, k) last t of each entity
        t = np.arange(1, last.max(initial=0) + 1)[None, :, None]             # (1, T, 1)
        if t.size == 0:  # every entity of these samples names only them
            continue
        ahead = sliding_window_view(index.ring, t.size)[index.at[rows] + 1]  # (m, k, T)
        partner = ahead.transpose(0, 2, 1).reshape(m, -1)                    # (m, T*k)
        valid = (t <= last[:, None, :]).reshape(m, -1)
        if k_ == 1:  # one entity: its candidates are distinct samples, at most P of them
            keep, rank = valid, np.broadcast_to(t.reshape(1, -1), valid.shape)
        else:  # drop repeated partners (rare: they share two entities), then keep the first P
            partner = np.where(valid, partner, -1 - np.arange(partner.shape[1]))  # never repeats
            ordered = np.sort(partner, axis=1)
            repeats = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
            keep = valid
            keep[repeats] &= ~_repeated(partner[repeats])
            rank = np.cumsum(keep, axis=1)
            keep &= rank <= p
        counts[samples] = keep.sum(axis=1)
        eid = np.broadcast_to(eid[:, None, :], (m, t.size, k_)).reshape(m, -1)
        drawn.append((samples, partner, eid, keep, rank))

    # Each sample's pairs fill its own slice of the output, in draw order.
    offsets = np.cumsum(counts) - counts
    partner_id = np.empty(counts.sum(), dtype=np.int64)
    entity = np.empty(len(partner_id), dtype=np.int32)
    for samples, partner, eid, keep, rank in drawn:
        slot = (offsets[samples, None] + rank - 1)[keep]
        partner_id[slot] = partner[keep]
        entity[slot] = eid[keep]
    return pa.table([np.repeat(index.sample_id[first], counts), partner_id,
                     pa.DictionaryArray.from_arrays(entity, index.entities)], schema=WRITE_SCHEMA)


def _repeated(values: np.ndarray) -> np.ndarray:
    """(m, w) -> (m, w): True where the same value comes earlier in its row."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    repeated_ordered = np.zeros(values.shape, dtype=bool)
    repeated_ordered[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeated = np.empty_like(repeated_ordered)
    np.put_along_axis(repeated, order, repeated_ordered, axis=1)
    return repeated


def write_pairs(index: SeededIndex, p: int, out: Path, chunk_rows: int, workers: int = 1) -> int:
    """Draw the pairs into `out` in ranges of samples of about `chunk_rows` index rows; returns
    the rows written. `workers` threads draw ranges ahead while this one writes them in order
    (numpy and Parquet both work outside the GIL)."""
    samples = len(index.starts) - 1
    bounds = np.unique(np.append(np.searchsorted(index.starts[:-1], np.arange(0, index.starts[-1], chunk_rows)),
                                 samples)).tolist()
    rows = 0
    with (pq.ParquetWriter(out, WRITE_SCHEMA, store_schema=False, use_dictionary=["entity"],
                           column_encoding=ENCODINGS, **stage.FAST_PARQUET) as writer,
          ThreadPoolExecutor(max_workers=workers) as pool):
        drawing = deque()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            drawing.append(pool.submit(draw_pairs, index, p, lo, hi))
            if len(drawing) > workers:
                rows += _write(writer, drawing.popleft().result())
        while drawing:
            rows += _write(writer, drawing.popleft().result())
    return rows


def _write(writer: pq.ParquetWriter, table: pa.Table) -> int:
    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    return table.num_rows
