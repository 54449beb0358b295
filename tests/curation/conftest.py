"""Fixtures of the curation tests (ingest/parse/select/manifest/pairs/sql)."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

SAMPLE_TSV = Path(__file__).resolve().parents[2] / "curation" / "data" / "cc12m_sample.tsv"


@pytest.fixture(scope="session")
def nlp():
    """The chunking pipeline, loaded once per test session (spaCy loads slowly)."""
    from ovseg.curation.parse import load_nlp

    return load_nlp()


@pytest.fixture(scope="session")
def curated_sample(tmp_path_factory, nlp) -> Path:
    """The bundled sample curated once with small shards: a read-only DATA folder for tests."""
    from ovseg.curation.ingest import IngestConfig
    from ovseg.curation.pipeline import CurateConfig, curate
    from ovseg.curation.select import SelectConfig

    data = tmp_path_factory.mktemp("curated") / "data"
    curate(data, CurateConfig(source=str(SAMPLE_TSV), ingest=IngestConfig(shard_size=100),
                              select=SelectConfig(top_k=20), threads=1))
    return data


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL): files put in the folder are served on 127.0.0.1 at an ephemeral port."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
