"""The loopback HTTP server: loopback only, ephemeral port, files and ranges, the test routes
that make downloads fail, and a stop that does not wait for slow requests."""

import io
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from ovseg.curation.serve import serve


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.bin").write_bytes(bytes(range(256)) * 4)
    return tmp_path


def _get(url, headers=None, timeout=5):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout)


def test_serves_files_on_loopback_at_an_ephemeral_port_and_counts_requests(root):
    with serve(root) as a, serve(root) as b:
        assert a.url.startswith("http://127.0.0.1:") and a.port not in (0, b.port)
        assert _get(a.url_for("images/a.bin")).read() == (root / "images" / "a.bin").read_bytes()
        _get(a.url_for("images/a.bin")).read()
        assert a.requests["/images/a.bin"] == 2 and b.requests["/images/a.bin"] == 0
        assert a._httpd.server_address[0] == "127.0.0.1"


def test_missing_files_and_folders_are_404_without_listing(root):
    with serve(root) as server:
        for path in ("images/missing.jpg", "images/", ""):
            with pytest.raises(urllib.error.HTTPError) as error:
                _get(server.url_for(path))
            assert error.value.code == 404


def test_byte_ranges_let_a_reader_seek(root):
    data = (root / "images" / "a.bin").read_bytes()
    with serve(root) as server:
        response = _get(server.url_for("images/a.bin"), {"Range": "bytes=100-199"})
        assert response.status == 206 and response.read() == data[100:200]
        assert _get(server.url_for("images/a.bin"), {"Range": "bytes=-24"}).read() == data[-24:]
        with pytest.raises(urllib.error.HTTPError) as error:
            _get(server.url_for("images/a.bin"), {"Range": f"bytes={len(data)}-"})
        assert error.value.code == 416


def test_test_routes_fail_in_the_ways_the_web_does(root):
    with serve(root, test_routes=True) as server:
        with pytest.raises(urllib.error.HTTPError) as error:
            _get(server.url + "/_status/404/x.jpg")
        assert error.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as error:
            _get(server.url + "/_status/503")
        assert error.value.code == 503
        redirected = _get(server.url + "/_redirect/images/a.bin")
        assert redirected.url == server.url_for("images/a.bin") and len(redirected.read()) == 1024
        junk = _get(server.url + "/_bytes/300/x.jpg")
        assert junk.headers["Content-Type"] == "image/jpeg" and len(junk.read()) == 300
        with Image.open(io.BytesIO(_get(server.url + "/_large/1500x1200.png").read())) as big:
            assert big.size == (1500, 1200)
        start = time.monotonic()
        assert len(_get(server.url + "/_slow/0.5/images/a.bin").read()) == 1024
        assert time.monotonic() - start >= 0.5
        with pytest.raises(TimeoutError):
            _get(server.url + "/_slow/3/images/a.bin", timeout=0.5).read()


def test_test_routes_are_off_unless_asked_for(root):
    with serve(root) as server:
        with pytest.raises(urllib.error.HTTPError) as error:
            _get(server.url + "/_bytes/300/x.jpg")
        assert error.value.code == 404


def test_stop_does_not_wait_for_a_slow_request_and_frees_the_port(root):
    with serve(root, test_routes=True) as server:
        port = server.port
        threading.Thread(target=lambda: _swallow(lambda: _get(server.url + "/_slow/30/images/a.bin", timeout=30)),
                         daemon=True).start()
        time.sleep(0.2)
        start = time.monotonic()
    assert time.monotonic() - start < 3
    with serve(root, port=port) as again:  # the same port can be served again (a resumed run)
        assert again.port == port
        assert _get(again.url_for("images/a.bin")).status == 200


def _swallow(fn):
    try:
        fn()
    except Exception:
        pass
