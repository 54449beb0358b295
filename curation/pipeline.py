"""All curation stages in order: ``ovseg curate cc12m`` (docs/pipeline.md).

ingest -> parse -> select -> manifest -> entity_index -> pairs. Each stage is skipped when its
completion marker says it already ran with the same settings, so rerunning a killed or finished
run only does what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ovseg.curation import build, ingest, parse, select, stage

log = logging.getLogger(__name__)


@dataclass
class CurateConfig:
    source: str = ingest.CC12M_URL
    table_format: str | None = None          # None: CC12M's header-less TSV; else tsv/csv/parquet with columns
    url_col: str = "url"
    caption_col: str = "caption"
    ingest: ingest.IngestConfig = field(default_factory=ingest.IngestConfig)
    workers: int = 1
    batch_size: int = 256
    spacy_model: str | None = None
    select: select.SelectConfig = field(default_factory=select.SelectConfig)
    pairs_per_sample: int = 10
    seed: int = 0
    threads: int | None = None
    memory_limit: str | None = None


def curate(data: Path, cfg: CurateConfig = CurateConfig(), force: bool = False,
           report: Callable[[str], None] = log.info) -> dict:
    """Run every stage into `data`; returns each stage's result by name."""
    data = Path(data)
    if data.exists() and not data.is_dir():
        raise stage.StageError(f"{data} is a file, not a data folder")
    data.mkdir(parents=True, exist_ok=True)
    results = {}
    if cfg.table_format is None:
        results["ingest"] = ingest.ingest_tsv(cfg.source, data, cfg.ingest, force=force)
    else:
        results["ingest"] = ingest.ingest_table(cfg.source, data, cfg.url_col, cfg.caption_col, cfg.table_format,
                                                cfg.ingest, force=force)
    report(describe("ingest", results["ingest"]))
    results["parse"] = parse.parse(data, cfg.workers, cfg.batch_size, cfg.spacy_model, force=force)
    report(describe("parse", results["parse"]))
    db = {"threads": cfg.threads, "memory_limit": cfg.memory_limit}
    results["select"] = select.select(data, cfg.select, force=force, **db)
    report(describe("select", results["select"]))
    results["manifest"] = build.build_manifest(data, force=force, **db)
    report(describe("manifest", results["manifest"]))
    results["entity_index"] = build.build_entity_index(data, force=force, **db)
    report(describe("entity_index", results["entity_index"]))
    results["pairs"] = build.build_pairs(data, cfg.pairs_per_sample, cfg.seed, force=force, **db)
    report(describe("pairs", results["pairs"]))
    return results


def describe(name: str, result) -> str:
    """One line about a stage's result, for the CLI."""
    prefix = f"{name}: " + ("already done, skipped (--force to redo); " if result.skipped else "")
    if name == "ingest":
        reasons = ", ".join(f"{n} {r}" for r, n in result.reasons.items())
        return prefix + f"{result.rows} rows: {result.kept} kept, {result.rejected} rejected" + (f" ({reasons})" if reasons else "")
    if name == "parse":
        rate = f" at {result.parsed_now / result.seconds:.0f} captions/s" if result.seconds > 0 and result.parsed_now else ""
        return prefix + f"{result.samples} captions in {result.parts} parts{rate}"
    if name == "select":
        missing = f"; not in the data: {', '.join(result.missing_vocabulary)}" if result.missing_vocabulary else ""
        return prefix + f"{result.selected} of {result.entities} entities selected{missing}"
    return prefix + f"{result.rows} rows"


__all__ = ["CurateConfig", "curate", "describe", "stage"]
