"""A loopback HTTP server for a folder: 127.0.0.1, an ephemeral port, threaded, started and
stopped by the code that needs it.

    with serve("OUT") as server:
        server.url                      # "http://127.0.0.1:43817"
        server.url_for("images/000001.jpg")
        server.requests["/images/000001.jpg"]   # how many times it was asked for

It serves files (GET and HEAD, single byte ranges so fsspec can seek) and never lists folders.
With `test_routes=True` it also answers special paths that tests use to make downloads fail
in the ways the web does:

    /_status/CODE/...            answer with that HTTP status (e.g. 404, 500)
    /_slow/SECONDS/PATH          wait, then serve PATH
    /_redirect/PATH              302 to /PATH
    /_bytes/N/NAME               N bytes that are not an image, sent as image/jpeg
    /_large/WxH.png              a WxH PNG drawn on the fly (for size limits)
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class LoopbackServer:
    """A running server; use `serve(...)` to get one."""

    def __init__(self, root: str | os.PathLike, port: int = 0, test_routes: bool = False, delay: float = 0.0):
        self.root = Path(root).resolve()
        self.test_routes = test_routes
        self.delay = delay
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="ovseg-loopback-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, path: str) -> str:
        return f"{self.url}/{urllib.parse.quote(str(path).lstrip('/'))}"

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a slow handler must not hold up stop()
    request_queue_size = 256  # img2dataset opens many connections at once


def _make_handler(server: LoopbackServer):
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(server.root), **kwargs)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
            log.debug("%s " + format, self.address_string(), *args)

        def list_directory(self, path):
            self.send_error(HTTPStatus.NOT_FOUND, "no listing")
            return None

        def _route(self) -> bool:
            """Answer a test path; False when the path is an ordinary file."""
            path = urllib.parse.urlsplit(self.path).path
            server._count(path)
            if server.delay:
                _sleep(server.delay, server._stopping)
            if not server.test_routes or not path.startswith("/_"):
                return False
            if m := re.fullmatch(r"/_status/(\d{3})(/.*)?", path):
                self.send_error(int(m.group(1)))
                return True
            if m := re.fullmatch(r"/_slow/([0-9.]+)(/.*)", path):
                _sleep(float(m.group(1)), server._stopping)
                self.path = m.group(2)
                return False
            if m := re.fullmatch(r"/_redirect(/.*)", path):
                self.send_response(HTTPStatus.FOUND)
                self.send_header("Location", m.group(1))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True
            if m := re.fullmatch(r"/_bytes/(\d+)(/.*)?", path):
                body = (b"this is not an image " * (int(m.group(1)) // 21 + 1))[: int(m.group(1))]
                self._send_bytes(body, "image/jpeg")
                return True
            if m := re.fullmatch(r"/_large/(\d+)x(\d+)\.png", path):
                from PIL import Image

                buffer = io.BytesIO()
                Image.new("RGB", (int(m.group(1)), int(m.group(2))), (200, 30, 30)).save(buffer, format="PNG")
                self._send_bytes(buffer.getvalue(), "image/png")
                return True
            self.send_error(HTTPStatus.NOT_FOUND)
            return True

        def _send_bytes(self, body: bytes, content_type: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            if self._route():
                return
            self._serve_file()

        def do_HEAD(self) -> None:
            if self._route():
                return
            self._serve_file()

        def _serve_file(self) -> None:
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            ranged = False
            if m := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip()):
                ranged = True
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # suffix range: the last N bytes
                    start = max(size - int(m.group(2) or 0), 0)
                if start >= size or start > end:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(HTTPStatus.PARTIAL_CONTENT if ranged else HTTPStatus.OK)
            self.send_header("Content-Type", self.guess_type(str(path)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            with open(path, "rb") as f:
                f.seek(start)
                remaining = end - start + 1
                try:
                    while remaining > 0:
                        chunk = f.read(min(remaining, 1 << 16))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        remaining -= len(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
                    pass

    return Handler


def _sleep(seconds: float, stop: threading.Event) -> None:
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        stop.wait(min(0.05, max(end - time.monotonic(), 0)))


@contextmanager
def serve(root: str | os.PathLike, port: int = 0, test_routes: bool = False, delay: float = 0.0) -> Iterator[LoopbackServer]:
    """Serve `root` on 127.0.0.1 (port 0: an ephemeral port) for the duration of the block.
    `delay` seconds are waited before answering each request (to slow a test down)."""
    server = LoopbackServer(root, port=port, test_routes=test_routes, delay=delay).start()
    try:
        yield server
    finally:
        server.stop()


__all__ = ["LoopbackServer", "serve"]
