"""The on-disk contract in code (`ovseg.curation.contract`): one definition of every table's
schema, member reads by offset, image decoding (16-bit images included) and the writer of a
small valid DATA folder that training tests and benchmarks use."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovseg.curation import contract


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


SAMPLES = [{"sample_id": i, "caption": f"a red circle {i}", "entities": ["circle", "red"] if i % 2 else ["circle"],
            "chunks": [{"start": 0, "end": 12, "entity": "circle"}]} for i in (4, 0, 7, 2, 5)]


def test_write_contract_writes_every_table_in_its_schema_and_members_read_back(tmp_path):
    images = {i: _jpeg(i) for i in (0, 2, 4, 7)}  # 5 did not download
    data = contract.write_contract(tmp_path / "D", SAMPLES, images, per_shard=3,
                                   pairs=[{"sample_id": 0, "partner_id": 2, "entity": "circle"}], entity_index=True)
    manifest = pq.read_table(data / contract.MANIFEST_DIR / contract.part_name(0))
    downloads = pq.read_table(data / contract.DOWNLOADS_FILE)
    assert manifest.schema == contract.MANIFEST_SCHEMA and manifest["sample_id"].to_pylist() == [0, 2, 4, 5, 7]
    assert downloads.schema == contract.DOWNLOADS_SCHEMA
    assert pq.read_table(data / contract.PAIRS_FILE).schema == contract.PAIRS_SCHEMA
    index = pq.read_table(data / contract.ENTITY_INDEX_FILE)
    assert index.schema == contract.ENTITY_INDEX_SCHEMA
    assert list(zip(index["entity"].to_pylist(), index["sample_id"].to_pylist())) == [
        ("circle", 0), ("circle", 2), ("circle", 4), ("circle", 5), ("circle", 7), ("red", 5), ("red", 7)]
    rows = {r["sample_id"]: r for r in downloads.to_pylist()}
    assert rows[5]["status"] == "failed_to_download" and rows[5]["shard"] is None
    assert {i: rows[i]["shard"] for i in images} == {0: "00000.tar", 2: "00000.tar", 4: "00001.tar", 7: "00002.tar"}
    for i, encoded in images.items():
        assert rows[i]["status"] == "success" and (rows[i]["width"], rows[i]["height"]) == (16, 16)
        member = contract.read_member(contract.shard_path(data, rows[i]["shard"]), rows[i]["offset"], rows[i]["size"])
        assert member == encoded


def test_read_member_past_the_end_is_a_short_read_error(tmp_path):
    shard = tmp_path / "x.tar"
    shard.write_bytes(b"0123456789")
    assert contract.read_member(str(shard), 2, 3) == b"234"
    with pytest.raises(OSError, match="short read at 8 \\(2 of 5 bytes\\)"):
        contract.read_member(str(shard), 8, 5)


def test_shard_path_is_under_images_unless_absolute_or_a_url():
    assert contract.shard_path("s3://bucket/DATA/", "00001.tar") == "s3://bucket/DATA/images/00001.tar"
    assert contract.shard_path("/d", "/elsewhere/00001.tar") == "/elsewhere/00001.tar"
    assert contract.shard_path("/d", "file:///x/00001.tar") == "file:///x/00001.tar"


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped():
    wide = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)  # (H, W) 16-bit
    encoded = _png(wide)
    assert Image.open(io.BytesIO(encoded)).mode.startswith("I")  # Pillow opens it as 16-bit
    image = contract.decode_image(encoded)
    assert image.mode == "RGB"
    got = np.asarray(image)[..., 0]
    assert got.tolist() == [[0, 1, 128], [255, 4, 233]]  # value / 257, rounded; a plain convert gives 255 for all but 0
    assert (np.asarray(image) == got[..., None]).all()  # grey: three equal channels


def test_8_bit_images_decode_exactly_as_pillow_converts_them():
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    gray = rgb[..., 0].copy()
    assert (np.asarray(contract.decode_image(_png(rgb))) == rgb).all()
    assert (np.asarray(contract.decode_image(_png(gray))) == gray[..., None]).all()


def test_a_truncated_image_fails_when_decoded_not_later():
    encoded = _jpeg(0, 64)
    with pytest.raises(OSError):
        contract.decode_image(encoded[: len(encoded) // 2])


def test_each_schema_and_path_has_one_definition_that_the_stages_use():
    from ovseg.curation import catalog, download, ingest, pairs, parse, stage

    assert ingest.CAPTIONS_SCHEMA is contract.CAPTIONS_SCHEMA and ingest.REJECTS_SCHEMA is contract.REJECTS_SCHEMA
    assert parse.PARSED_SCHEMA is contract.PARSED_SCHEMA
    assert download.DOWNLOADS_SCHEMA is contract.DOWNLOADS_SCHEMA and download.read_member is contract.read_member
    assert catalog.TABLES is contract.TABLES and stage.part_name is contract.part_name
    assert pairs.WRITE_SCHEMA.names == contract.PAIRS_SCHEMA.names  # entity dictionary-encoded, read back as string
    assert contract.MANIFEST_SCHEMA.field("chunks").type == contract.PARSED_SCHEMA.field("chunks").type
