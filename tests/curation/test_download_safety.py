"""Damaged download outputs give one-line errors or are passed over, never a hang (issue 26 items 7, 8)."""

from __future__ import annotations

import io
import tarfile
import threading

import pytest

from ovseg.curation.download import DownloadError, member_offsets


def _tar_with_size_field(tmp_path, field: bytes):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.jpg", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 600
            tar.addfile(info, io.BytesIO(b"x" * 600))
    raw = bytearray(buffer.getvalue())
    second = 512 + 1024  # the second member's header
    raw[second + 124: second + 136] = field
    raw[second + 148: second + 156] = b"        "  # checksum recomputed over the changed header
    raw[second + 148: second + 156] = b"%06o\0 " % sum(raw[second: second + 512])
    path = tmp_path / "00000.tar"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("field", [b"-0000001000\0", b"\xff" * 12, b"zzzzzzzzzzz\0"])
def test_a_tar_header_with_a_negative_or_garbled_size_is_an_error_not_a_hang(tmp_path, field):
    path = _tar_with_size_field(tmp_path, field)
    outcome = {}

    def run():
        try:
            outcome["value"] = member_offsets(str(path), "jpg")
        except Exception as error:  # noqa: BLE001  (the test inspects it)
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "member_offsets looped"
    assert isinstance(outcome.get("error"), DownloadError) and "damaged tar header at byte 1536" in str(outcome["error"])


def test_an_intact_tar_still_gives_every_offset(tmp_path):
    path = _tar_with_size_field(tmp_path, b"%011o\0" % 600)
    assert member_offsets(str(path), "jpg") == {"a": (512, 600), "b": (1536 + 512, 600)}


def test_the_catalog_passes_over_a_zero_byte_images_parquet_left_by_a_killed_download(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovseg.curation.catalog import build_catalog, connect_read_only

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    pq.write_table(pa.table({"sample_id": [1, 2]}), data / "images" / "00000.parquet")
    (data / "images" / "00001.parquet").write_bytes(b"")
    build_catalog(data)
    con = connect_read_only(data)
    assert con.sql("SELECT count(*) FROM images").fetchall() == [(2,)]
