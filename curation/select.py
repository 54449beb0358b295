"""The select stage: entity frequencies over ``DATA/parsed/`` into ``DATA/entities.parquet``.

One row per distinct entity with ``n_samples`` (captions naming it), ``n_mentions`` (noun chunks
rooted on it), ``rank`` (1 = most samples; ties broken alphabetically), ``selected`` and, for each
entity left out, ``excluded_reason``:

- ``stoplist``: a non-visual word of the stoplist (``curation/data/stoplist.txt`` by default);
- ``below_top_k``: not among the K most frequent entities that are not stoplisted;
- ``not_in_vocabulary``: a fixed vocabulary was given and does not list it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovseg.curation import stage
from ovseg.curation.contract import ENTITIES_FILE, PARSED_DIR

ENTITIES_SCHEMA_SQL = "entity VARCHAR, n_samples BIGINT, n_mentions BIGINT, rank BIGINT, selected BOOLEAN, excluded_reason VARCHAR"


def read_word_list(path: str | Path) -> list[str]:
    """Words of a list file: one per line, lower-cased, '#' comments and blank lines ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise stage.StageError(f"cannot read word list {path}: {error.strerror or error}") from error
    words = []
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word and word not in words:
            words.append(word)
    return words


def default_stoplist() -> list[str]:
    with resources.as_file(resources.files("ovseg.curation") / "data" / "stoplist.txt") as path:
        return read_word_list(path)


@dataclass(frozen=True)
class SelectConfig:
    top_k: int | None = 100                 # the K most frequent non-stoplisted entities
    vocabulary: tuple[str, ...] | None = None  # or exactly these entities (then top_k is ignored)
    stoplist: tuple[str, ...] = field(default_factory=lambda: tuple(default_stoplist()))

    @classmethod
    def from_files(cls, top_k: int | None = 100, vocabulary: str | Path | None = None,
                   stoplist: str | Path | None = None, stoplist_add: list[str | Path] = ()) -> "SelectConfig":
        words = read_word_list(stoplist) if stoplist else default_stoplist()
        for extra in stoplist_add:
            words += [w for w in read_word_list(extra) if w not in words]
        vocab = tuple(read_word_list(vocabulary)) if vocabulary else None
        if vocab is None and (top_k is None or top_k < 1):
            raise stage.StageError("--top-k-entities must be at least 1 (or give --vocabulary FILE)")
        return cls(top_k=None if vocab else top_k, vocabulary=vocab, stoplist=tuple(words))


@dataclass
class SelectResult:
    entities: int
    selected: int
    missing_vocabulary: list[str]
    skipped: bool = False


def entity_counts(parts: list[Path]) -> tuple[pa.Table, pa.Table]:
    """(entity, n_samples) and (entity, n_mentions) over parsed parts. The entity strings are
    read as each part's dictionary, so mentions are counted as integer codes and only a part's
    distinct entities are grouped by name."""
    counted = {name: [pa.table({"entity": pa.array([], pa.string()), name: pa.array([], pa.int64())})]
               for name in ("n_samples", "n_mentions")}
    for part in parts:
        table = pq.read_table(part, columns=["entities", "chunks"],
                              read_dictionary=[stage.ENTITIES_STRINGS, stage.CHUNKS_ENTITY])
        mentioned = {"n_samples": pc.list_flatten(table["entities"]),  # an entity is listed once per sample
                     "n_mentions": pc.struct_field(pc.list_flatten(table["chunks"]), "entity")}
        for name, values in mentioned.items():
            for chunk in values.chunks:
                codes = stage.dictionary_of(chunk)
                counts = np.bincount(codes.indices.to_numpy(), minlength=len(codes.dictionary))
                counted[name].append(pa.table({"entity": codes.dictionary, name: counts}))
    samples, mentions = (pa.concat_tables(tables).group_by("entity").aggregate([(name, "sum")])
                         .rename_columns(["entity", name]) for name, tables in counted.items())
    return samples, mentions


def select(data: Path, cfg: SelectConfig = SelectConfig(), force: bool = False, threads: int | None = None,
           memory_limit: str | None = None) -> SelectResult:
    data = Path(data)
    parse_marker = stage.require(data, "parse", "select")
    settings = {**asdict(cfg), "stoplist": sorted(cfg.stoplist),
                "vocabulary": sorted(cfg.vocabulary) if cfg.vocabulary else None, "parse": parse_marker["settings"]}
    if not force and stage.is_done(data, "select", settings):
        counts = stage.read_marker(data, "select")["counts"]
        stage.refresh_catalog(data)
        return SelectResult(counts["entities"], counts["selected"], counts["missing_vocabulary"], skipped=True)
    stage.start(data, "select")
    con = stage.duckdb_connect(threads, memory_limit, data / "_spill")
    con.execute(f"CREATE TEMP TABLE stop AS SELECT unnest($1::VARCHAR[]) AS entity", [list(cfg.stoplist)])
    con.execute(f"CREATE TEMP TABLE vocab AS SELECT unnest($1::VARCHAR[]) AS entity", [list(cfg.vocabulary or [])])
    samples, mentions = entity_counts(stage.parts(data / PARSED_DIR))
    con.register("samples", samples)
    con.register("mentions", mentions)
    con.execute(f"""
        CREATE TEMP TABLE freq AS
        SELECT s.entity, s.n_samples, m.n_mentions,
               row_number() OVER (ORDER BY s.n_samples DESC, s.entity) AS rank,
               s.entity IN (SELECT entity FROM stop) AS stopped
        FROM samples s JOIN mentions m USING (entity)""")
    if cfg.vocabulary is not None:
        rule = ("CASE WHEN stopped THEN 'stoplist' "
                "WHEN entity NOT IN (SELECT entity FROM vocab) THEN 'not_in_vocabulary' END")
    else:
        rule = ("CASE WHEN stopped THEN 'stoplist' "
                f"WHEN row_number() OVER (PARTITION BY stopped ORDER BY rank) > {int(cfg.top_k)} THEN 'below_top_k' END")
    out = data / ENTITIES_FILE
    tmp = out.with_name(out.name + ".tmp")
    con.execute(f"""
        COPY (SELECT entity, n_samples, n_mentions, rank, reason IS NULL AS selected, reason AS excluded_reason
              FROM (SELECT *, {rule} AS reason FROM freq) ORDER BY rank)
        TO {stage.sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)""")
    tmp.replace(out)
    n_entities, n_selected = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE selected) FROM read_parquet({stage.sql_path(out)})").fetchone()
    missing = [r[0] for r in con.execute(
        "SELECT entity FROM vocab WHERE entity NOT IN (SELECT entity FROM freq) ORDER BY entity").fetchall()]
    con.close()
    stage.finish(data, "select", settings, {"entities": n_entities, "selected": n_selected, "missing_vocabulary": missing})
    from ovseg.curation.catalog import build_catalog

    build_catalog(data)
    return SelectResult(n_entities, n_selected, missing)
