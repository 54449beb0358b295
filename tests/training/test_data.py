"""The data set over the on-disk contract: reading by offset, masking, pairs, skipping, order."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ovseg.curation.contract import IMAGENET_MEAN, IMAGENET_STD, read_member
from ovseg.training.config import DataConfig, RunConfig
from ovseg.training.tokenizer import train_wordpiece
from ovseg.training.data import (
    CaptionImageDataset, ResumableSampler, collate, entity_key, entity_prompt, load_samples, masked_question,
    TEXT_FIELDS, build_transform, fixed_length_encoder, normalize_images,
)

from .conftest import make_contract

WORDS = ["a", "photo", "of", "red", "circle", "square", "star", "on", "striped", "background", "and", "thing", "."]


@pytest.fixture(scope="module")
def tokenizer():
    captions = [" ".join(WORDS)] * 3 + ["a photo of a red circle on a striped background"] * 3
    return train_wordpiece(captions, vocab_size=100, min_frequency=1)


STAGES = RunConfig().train.stages  # the default stages: DeiT-style, then crop and flip with a partner
STAGE1, STAGE2 = STAGES
IN_BATCH = replace(STAGE2, partners="in_batch")


def _cfg(**kw):
    base = dict(randaugment=None, random_erasing=0.0, color_jitter=0.0, max_text_length=16)
    base.update(kw)
    return DataConfig(**base)


def test_only_successful_downloads_are_samples(tmp_path):
    table = load_samples(str(make_contract(tmp_path / "D", n=12, failed=(3, 7))))
    assert sorted(table.sample_id.tolist()) == [i for i in range(12) if i not in (3, 7)]


def test_member_read_by_offset_is_the_image(contract):
    table = load_samples(str(contract))
    data = read_member(table.shard[0], int(table.offset[0]), int(table.size[0]))
    assert data[:2] == b"\xff\xd8"  # a JPEG


def test_question_masks_the_entity_word_and_answer_names_it(tokenizer):
    caption = "a photo of a red circle on a striped background"
    chunks = [{"start": 11, "end": 23, "entity": "circle"},
              {"start": 27, "end": len(caption), "entity": "background"}]
    enc = tokenizer(caption, return_offsets_mapping=True)
    question, masked = masked_question(caption, chunks, {"circle"}, enc["offset_mapping"],
                                       enc["input_ids"], tokenizer.mask_token_id)
    words = tokenizer.convert_ids_to_tokens(question)
    assert masked == ["circle"]
    assert words.count("[MASK]") == 1 and "red" in words and "background" in words  # only the selected root
    assert entity_prompt(["dog", "person"], "a photo of a {}.") == "a photo of a dog and a person."


@pytest.mark.parametrize("text", ["a photo of a red circle on a striped background", "", "zebra unicorn ###",
                                  " ".join(WORDS * 3)])  # the last is longer than max_length: truncated
def test_fixed_length_encoder_gives_what_the_tokenizer_call_gives(tokenizer, text):
    encoder = fixed_length_encoder(tokenizer, 16)
    want = tokenizer(text, max_length=16, truncation=True, padding="max_length", return_offsets_mapping=True)
    got = encoder.encode(text)
    assert got.ids == want["input_ids"] and got.attention_mask == want["attention_mask"]
    assert [tuple(o) for o in got.offsets] == [tuple(o) for o in want["offset_mapping"]]
    assert len(got.ids) == 16
    assert len(tokenizer(text)["input_ids"]) == len(tokenizer.backend_tokenizer.encode(text).ids)  # caller untouched


def test_sample_has_the_batch_keys_of_the_contract(contract, tokenizer):
    ds = CaptionImageDataset(load_samples(str(contract)), tokenizer, 32, STAGE1, _cfg(), seed=0)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32)
    for key in ("input_ids", "attention_mask", "question_ids", "question_mask", "answer_ids", "answer_mask"):
        assert batch[key].shape[0] == 2 and batch[key].dtype == torch.long
    assert batch["has_entity"].all()
    assert (batch["question_ids"] == tokenizer.mask_token_id).any(dim=1).all()
    # one prompt per masked entity, padded to max_entities slots with key -1; the token axis
    # is trimmed to the longest prompt (see test_collate_trims_only_padding)
    assert batch["entity_prompt_ids"].shape[:2] == (2, 3) and batch["entity_keys"].shape == (2, 3)
    shapes = load_samples(str(contract)).entities
    assert batch["entity_keys"][:, 0].tolist() == [entity_key(shapes[0][0]), entity_key(shapes[1][0])]
    assert (batch["entity_keys"][:, 1:] == -1).all()
    first = tokenizer.decode(batch["entity_prompt_ids"][0, 0], skip_special_tokens=True)
    assert first.replace(" .", ".") == f"a photo of a {shapes[0][0]}."


def test_cached_prompts_are_the_uncached_ones_and_the_cache_stays_bounded(contract, tokenizer, monkeypatch):
    """Answers and grounding slots are built once per entity list; a full cache starts again."""
    from ovseg.training import data

    monkeypatch.setattr(data, "CACHE_ROWS", 2)
    ds = CaptionImageDataset(load_samples(str(contract)), tokenizer, 32, STAGE1, _cfg(), seed=0)
    lists = [["circle"], ["square", "star"], ["star"], ["circle"]]
    for masked in lists:
        direct = ds._encoder.encode(entity_prompt(masked, ds.cfg.prompt_template))
        assert ds._answer(masked) == {"input_ids": direct.ids, "attention_mask": direct.attention_mask}
        slots = ds._entity_prompts(masked)
        keys = [entity_key(e) for e in masked] + [-1] * (ds.cfg.max_entities - len(masked))
        assert slots["entity_keys"].tolist() == keys
        assert slots["entity_prompt_ids"][0].tolist() == ds._encoder.encode(ds.cfg.prompt_template.format(masked[0])).ids
        assert len(ds._answer_cache) <= 2 and len(ds._slots_cache) <= 2
    assert ds._entity_prompts(["circle"]) is ds._entity_prompts(["circle"])  # reused, not rebuilt


def test_collate_trims_only_padding(contract, tokenizer):
    ds = CaptionImageDataset(load_samples(str(contract)), tokenizer, 32, STAGE1, _cfg(max_text_length=32), seed=0)
    items = [ds[0], ds[1], ds[2]]
    batch = collate(items)
    fields = [(ids, mask) for ids, mask in TEXT_FIELDS if ids in items[0]]
    assert len(fields) == 4  # stage 1: caption, question, answer, entity prompts
    for ids, mask in fields:
        full = torch.stack([torch.as_tensor(item[ids]) for item in items])
        full_mask = torch.stack([torch.as_tensor(item[mask]) for item in items])
        length = batch[ids].shape[-1]
        assert full.shape[-1] == 32 and length < 32  # the captions are much shorter than 32 tokens
        assert batch[mask].flatten(0, -2).any(dim=0)[-1]  # the last kept position is real in some row
        assert torch.equal(batch[ids], full[..., :length]) and torch.equal(batch[mask], full_mask[..., :length])
        assert not full_mask[..., length:].any()  # nothing real was cut


def test_corrupt_member_is_skipped_and_counted(tmp_path, tokenizer):
    root = make_contract(tmp_path / "D", n=6, corrupt=(2,))
    ds = CaptionImageDataset(load_samples(str(root)), tokenizer, 32, STAGE1, _cfg(), seed=0)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["n_skipped"] == 1 and batch["image"].shape[0] == 5
    assert 2 not in batch["sample_id"].tolist()


def test_truncated_jpeg_is_skipped_and_counted(tmp_path, tokenizer):
    root = make_contract(tmp_path / "D", n=4, truncated=(1,))
    ds = CaptionImageDataset(load_samples(str(root)), tokenizer, 32, STAGE1, _cfg(), seed=0)
    assert ds[1] is None and ds[0] is not None


def test_augmentation_errors_are_raised_not_counted_as_unreadable_images(contract, tokenizer):
    ds = CaptionImageDataset(load_samples(str(contract)), tokenizer, 32, STAGE1, _cfg(), seed=0)

    def broken(image):
        raise RuntimeError("a bug in an augmentation")

    ds.transform = broken
    with pytest.raises(RuntimeError, match="a bug in an augmentation"):
        ds[0]


def test_posterize_at_the_clipped_magnitude_gives_black_not_an_error():
    """timm asks for 0 bits at magnitude 10, which Pillow 13 refuses; older Pillow gave black."""
    from PIL import Image

    transform = build_transform(32, STAGE1, DataConfig(randaugment="rand-n1-m10-mstd0-inc1", color_jitter=0.0,
                                                  random_erasing=0.0))
    augment = next(step for step in transform.transforms if hasattr(step, "ops"))
    posterize = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    image = Image.new("RGB", (32, 32), (200, 120, 40))
    assert np.asarray(posterize(image)).max() == 0
    assert np.asarray(posterize.aug_fn(image, 2)).tolist() == np.asarray(image).__and__(0xC0).tolist()  # 2 bits


def test_augmentation_depends_only_on_seed_epoch_and_sample(contract, tokenizer):
    table = load_samples(str(contract))
    a = CaptionImageDataset(table, tokenizer, 32, STAGE1, _cfg(), seed=3)
    b = CaptionImageDataset(table, tokenizer, 32, STAGE1, _cfg(), seed=3)
    torch.rand(5)  # disturbing the global RNG changes nothing
    assert torch.equal(a[4]["image"], b[4]["image"])
    a.set_epoch(1)
    assert not torch.equal(a[4]["image"], b[4]["image"])


def test_images_leave_the_loader_as_uint8_and_normalise_as_torchvision_would(contract, tokenizer):
    from PIL import Image
    from torchvision.transforms import functional as TF

    for stage in (1, 2):
        ds = CaptionImageDataset(load_samples(str(contract), with_pairs=stage == 2), tokenizer, 32, STAGES[stage - 1], _cfg(), seed=0)
        batch = collate([ds[0], ds[1]])
        keys = ["image"] + (["partner_image"] if stage == 2 else [])
        raw = {k: batch[k].clone() for k in keys}
        assert all(raw[k].dtype == torch.uint8 and raw[k].shape == (2, 3, 32, 32) for k in keys)
        normalize_images(batch, IMAGENET_MEAN, IMAGENET_STD)
        for k in keys:
            pil = Image.fromarray(raw[k][1].permute(1, 2, 0).numpy())
            expected = TF.normalize(TF.to_tensor(pil), IMAGENET_MEAN, IMAGENET_STD)
            assert batch[k].dtype == torch.float32 and torch.allclose(batch[k][1], expected, atol=1e-5)


def _erased(mode: str):
    from PIL import Image

    torch.manual_seed(0)
    transform = build_transform(64, STAGE1, _cfg(random_erasing=1.0, erasing_mode=mode))
    out = transform(Image.new("RGB", (64, 64), (255, 255, 255)))
    erased = (out != 255).any(dim=0)
    assert out.dtype == torch.uint8 and 0 < erased.sum() < 64 * 64  # a box, the rest still white
    return normalize_images({"image": out[None]})["image"][0], erased


def test_const_erasing_paints_the_mean_colour_that_normalises_to_zero():
    normalised, erased = _erased("const")
    assert normalised[:, erased].abs().max() < 0.01


def test_pixel_erasing_paints_noise_that_normalises_to_a_standard_normal():
    """timm's "pixel" mode, which the public code's configs use (re_mode: pixel)."""
    normalised, erased = _erased("pixel")
    noise = normalised[:, erased]
    assert noise.numel() > 300
    assert abs(noise.mean().item()) < 0.15 and 0.8 < noise.std().item() < 1.1  # a little is clipped at 0 and 255


def test_the_public_code_s_resize_is_the_default_and_bad_modes_are_refused():
    from torchvision.transforms import InterpolationMode

    stage1, stage2 = (build_transform(32, s, DataConfig()).transforms[0] for s in (STAGE1, STAGE2))
    assert stage1.interpolation == InterpolationMode.BILINEAR and stage2.interpolation == InterpolationMode.BILINEAR
    assert build_transform(32, STAGE2, _cfg(interpolation="bicubic")).transforms[0].interpolation == InterpolationMode.BICUBIC
    with pytest.raises(ValueError, match="data.interpolation"):
        build_transform(32, STAGE1, _cfg(interpolation="nearest"))
    with pytest.raises(ValueError, match="data.erasing_mode"):
        build_transform(32, STAGE1, _cfg(random_erasing=0.5, erasing_mode="rand"))


def test_stage2_partner_shares_an_entity_and_redraws_each_epoch(contract, tokenizer):
    table = load_samples(str(contract), with_pairs=True)
    ds = CaptionImageDataset(table, tokenizer, 32, STAGE2, _cfg(), seed=0)
    item = ds[0]
    assert item["has_partner"] and item["partner_image"].shape == (3, 32, 32)
    words = tokenizer.convert_ids_to_tokens(item["shared_ids"])
    assert "circle" in words  # sample 0 is a circle; its partners are circles
    partners = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        partners.add(ds[0]["partner_image"].sum().item())
    assert len(partners) > 1


def test_stage2_pairs_in_batch_put_each_partner_in_the_batch_as_a_full_sample(tmp_path, tokenizer):
    root = make_contract(tmp_path / "D", n=24, corrupt=(23,))
    table = load_samples(str(root), with_pairs=True)
    ds = CaptionImageDataset(table, tokenizer, 32, IN_BATCH, _cfg(), seed=0)
    unpaired = next(i for i in range(len(ds)) if int(table.sample_id[i]) not in table.partners and i != 23)
    items = [ds[0], ds[1], ds[unpaired], ds[23]]
    assert [len(x) for x in items[:3]] == [2, 2, 1] and items[3] is None  # 23 cannot be read
    batch = collate(items)
    assert batch["n_items"] == 4 and batch["n_skipped"] == 1 and batch["image"].shape == (5, 3, 32, 32)
    assert "partner_image" not in batch
    # the samples first, then their partners; each row points at its partner's row
    assert batch["partner_index"].tolist() == [3, 4, -1, 0, 1]
    assert batch["has_partner"].tolist() == [True, True, False, True, True]
    ids = batch["sample_id"].tolist()
    assert ids[:3] == [0, 1, int(table.sample_id[unpaired])]
    for row, partner in [(0, 3), (1, 4)]:
        assert ids[partner] != ids[row] and ids[partner] % 3 == ids[row] % 3  # the contract's pairs share a shape
        assert torch.equal(batch["shared_ids"][row], batch["shared_ids"][partner])
    # a partner row is a full sample: its own caption, question and entity prompts
    partner_item = items[0][1]
    assert partner_item["sample_id"] == ids[3] and torch.equal(batch["image"][3], partner_item["image"])
    assert {"input_ids", "question_ids", "answer_ids", "entity_keys"} <= set(partner_item)
    assert "circle" in tokenizer.convert_ids_to_tokens(batch["shared_ids"][0])


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    full = list(ResumableSampler(10, seed=1))
    resumed = ResumableSampler(10, seed=1)
    resumed.set_epoch(0, start=4)
    assert list(resumed) == full[4:]
    ranks = [list(ResumableSampler(10, rank=r, world_size=3, seed=1)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    assert set(sum(ranks, [])) == set(range(10))
    other = ResumableSampler(10, seed=1)
    other.set_epoch(1)
    assert list(other) != full and sorted(other) == list(range(10))


def test_a_16_bit_png_is_scaled_to_8_bits_by_the_loader_not_clipped(tmp_path, tokenizer):
    import io

    from PIL import Image

    from ovseg.curation.contract import write_contract

    wide = np.full((32, 32), 32896, dtype=np.uint16)  # (H, W): mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    caption = "a photo of a red circle on a striped background"
    root = write_contract(tmp_path / "D", [{"sample_id": 0, "caption": caption, "entities": ["circle"],
                                            "chunks": [{"start": 11, "end": 23, "entity": "circle"}]}],
                          {0: buf.getvalue()})
    ds = CaptionImageDataset(load_samples(str(root)), tokenizer, 32, STAGE1, _cfg(), seed=0)
    image = ds._decode(0)
    assert image.mode == "RGB" and set(np.asarray(image).ravel().tolist()) == {128}
