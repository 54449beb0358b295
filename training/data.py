"""Training samples from the on-disk contract (docs/schemas.md, `ovseg.curation.contract`), never
from curation's stages.

The samples are the manifest rows whose image downloaded (`downloads.status = 'success'`); each
image is read from its webdataset shard by (shard, offset, size) with one seek, so nothing but
the small tables stays in memory. Captions are tokenised; the masked-entity question and its
answer prompt come from the manifest's `chunks`; in stage 2 a partner image sharing an entity is
drawn from `pairs` with a fresh seeded draw each epoch.

Randomness is a pure function of (seed, epoch, sample): the order comes from the sampler's
seeded permutation and every sample's augmentation from its own seeded generator, so a resumed
run sees exactly the batches an uninterrupted one would, whatever the number of workers.
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from PIL import Image

from ovseg.curation.contract import (DOWNLOADS_FILE, IMAGENET_MEAN, IMAGENET_STD, MANIFEST_DIR, PAIRS_FILE,
                                     decode_image, join, read_member, shard_path)

if TYPE_CHECKING:
    from ovseg.training.config import StageConfig

log = logging.getLogger(__name__)


@dataclass
class SampleTable:
    """The downloaded samples, as columns (one row per sample, ordered by sample_id)."""

    sample_id: np.ndarray
    caption: list[str]
    chunks: list[list[dict]]
    entities: list[list[str]]
    shard: list[str]
    offset: np.ndarray
    size: np.ndarray
    partners: dict[int, list[tuple[int, str]]]

    def __len__(self) -> int:
        return len(self.sample_id)


def load_samples(data_dir: str, with_pairs: bool = False) -> SampleTable:
    """Join the manifest with the successful downloads (and pairs among them)."""
    root = str(data_dir)
    fs, path = fsspec.core.url_to_fs(root)
    manifest = pads.dataset(join(path, MANIFEST_DIR), format="parquet", filesystem=fs).to_table(
        columns=["sample_id", "caption", "entities", "chunks"])
    downloads = pq.read_table(join(path, DOWNLOADS_FILE), filesystem=fs,
                              columns=["sample_id", "status", "shard", "offset", "size"])
    downloads = downloads.filter(pc.equal(downloads["status"], "success"))
    # an inner join on sample_id (Arrow's join cannot carry list columns, so: filter both, sort both)
    manifest = manifest.filter(pc.is_in(manifest["sample_id"], value_set=downloads["sample_id"])).sort_by("sample_id")
    downloads = downloads.filter(pc.is_in(downloads["sample_id"], value_set=manifest["sample_id"])).sort_by("sample_id")
    if not manifest["sample_id"].equals(downloads["sample_id"]):
        raise ValueError(f"{root}: downloads.parquet has duplicate sample_ids")
    table = manifest
    for name in ("shard", "offset", "size"):
        table = table.append_column(name, downloads[name])
    if table.num_rows == 0:
        raise ValueError(f"{root}: no downloaded samples (manifest joined with downloads where status = 'success')")
    ids = table["sample_id"].to_numpy()
    partners: dict[int, list[tuple[int, str]]] = {}
    if with_pairs:
        pairs = pq.read_table(join(path, PAIRS_FILE), filesystem=fs,
                              columns=["sample_id", "partner_id", "entity"])
        keep = pc.and_(pc.is_in(pairs["sample_id"], value_set=table["sample_id"]),
                       pc.is_in(pairs["partner_id"], value_set=table["sample_id"]))
        pairs = pairs.filter(keep).sort_by([("sample_id", "ascending"), ("partner_id", "ascending")])
        for sid, pid, entity in zip(pairs["sample_id"].to_pylist(), pairs["partner_id"].to_pylist(),
                                    pairs["entity"].to_pylist()):
            partners.setdefault(sid, []).append((pid, entity))
    shards = [shard_path(root, s) for s in table["shard"].to_pylist()]
    return SampleTable(
        sample_id=ids, caption=table["caption"].to_pylist(), chunks=table["chunks"].to_pylist(),
        entities=table["entities"].to_pylist(), shard=shards,
        offset=table["offset"].to_numpy(), size=table["size"].to_numpy(), partners=partners,
    )


def build_transform(image_size: int, stage: "StageConfig", cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Augmentations that end in a uint8 (3, H, W) tensor; `normalize_images` turns a batch of
    them into the model's float input on its device (timm's prefetcher split: a quarter of the
    bytes between processes and to the GPU, and the float work done once per batch).
    The stage's `augment` "deit": DeiT-style (random resized crop, flip, RandAugment, colour
    jitter) through timm's factory, then random erasing; "crop_flip": random resized crop and
    flip only (the public code's stage 2). The crop's smallest scale is the stage's `crop`. The
    public code's configs resize bilinearly and erase with per-pixel noise (`cfg.interpolation`,
    `cfg.erasing_mode`)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    if cfg.interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"data.interpolation must be bilinear or bicubic, not {cfg.interpolation!r}")
    if stage.augment == "deit":
        steps = create_transform(
            image_size, is_training=True, scale=(stage.crop, 1.0), hflip=cfg.hflip,
            auto_augment=cfg.randaugment, color_jitter=cfg.color_jitter, use_prefetcher=True,
            interpolation=cfg.interpolation, mean=mean,  # RandAugment fills with the mean colour too
        ).transforms
        for step in steps:
            _guard_posterize(step)
        if cfg.random_erasing > 0:
            steps.append(UInt8Erasing(cfg.random_erasing, cfg.erasing_mode, mean, std))
        return T.Compose(steps)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(stage.crop, 1.0),
                            interpolation=T.InterpolationMode(cfg.interpolation)),
        T.RandomHorizontalFlip(cfg.hflip),
        T.PILToTensor(),
    ])


class UInt8Erasing(torch.nn.Module):
    """Random erasing (one box, 2-33% of the area, aspect 0.3-3.3: torchvision's and timm's
    defaults) of a uint8 image, in what timm's modes give once the image is normalised: "pixel"
    fills the box with noise that is N(0, 1) after normalisation (mean + std * z, clipped to
    0..255), "const" with the mean colour (0 after normalisation)."""

    def __init__(self, p: float, mode: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        if mode not in ("pixel", "const"):
            raise ValueError(f"data.erasing_mode must be pixel or const, not {mode!r}")
        self.p, self.mode = p, mode
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision import transforms as T

        if torch.rand(1).item() >= self.p:
            return image
        # value None: per-pixel N(0, 1) noise of the box's shape; [0.0]: zero, broadcast over it
        i, j, h, w, noise = T.RandomErasing.get_params(image, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                                                       value=None if self.mode == "pixel" else [0.0])
        image = image.clone()
        image[:, i:i + h, j:j + w] = ((self.mean + self.std * noise) * 255).round().clamp(0, 255).to(torch.uint8)
        return image


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits giving the black image that Pillow gave before 13."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _guard_posterize(step) -> None:
    """timm's "increasing" posterize keeps 4 - 4 * m / 10 bits, so every magnitude draw clipped
    at 10 (2% of them at m9-mstd0.5) asks Pillow for 0 bits, which Pillow 13 refuses with a
    ValueError: the loader would drop those samples as unreadable. Give timm's RandAugment
    posterize ops the old behaviour instead."""
    for op in getattr(step, "ops", ()):
        if getattr(op, "name", "").startswith("Posterize"):
            op.aug_fn = _posterize


IMAGE_FIELDS = ("image", "partner_image")


def normalize_images(batch: dict[str, Any], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict[str, Any]:
    """The batch's uint8 images as normalised float32, on whatever device they are."""
    for key in IMAGE_FIELDS:
        if key in batch and batch[key].dtype == torch.uint8:
            x = batch[key]
            m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
            batch[key] = (x.float() / 255 - m) / s
    return batch


def entity_prompt(entities: list[str], template: str) -> str:
    """"a photo of a dog and a person." from ["dog", "person"]."""
    if not entities:
        return template.format("thing")
    return template.format(" and a ".join(entities))


def entity_key(entity: str) -> int:
    """A stable non-negative id of an entity word (the same in every process and run)."""
    return zlib.crc32(entity.encode("utf-8")) & 0x7FFFFFFF


def masked_question(caption: str, chunks: list[dict], selected: set[str], offsets: list[tuple[int, int]],
                    input_ids: list[int], mask_id: int) -> tuple[list[int], list[str]]:
    """Mask the tokens of each selected entity's word: the last word of its noun chunk (the
    chunk's root in English), located through the tokenizer's character offsets."""
    question = list(input_ids)
    masked: list[str] = []
    for chunk in chunks or []:
        entity = chunk["entity"]
        if entity not in selected:
            continue
        start, end = int(chunk["start"]), int(chunk["end"])
        text = caption[start:end].rstrip()
        word_start = start + (text.rfind(" ") + 1 if " " in text else 0)
        word_end = start + len(text)
        hit = False
        for i, (a, b) in enumerate(offsets):
            if b > a and a < word_end and b > word_start:
                question[i] = mask_id
                hit = True
        if hit and entity not in masked:
            masked.append(entity)
    return question, masked


def fixed_length_encoder(tokenizer, length: int):
    """The fast tokenizer's Rust backend, copied and set to truncate and pad to `length` as
    `tokenizer(text, max_length=length, truncation=True, padding="max_length")` does. Calling
    the backend directly skips the transformers wrapper, which costs more than the encoding
    itself, once or twice per sample (the copy leaves the caller's tokenizer untouched)."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.enable_truncation(length, direction=tokenizer.truncation_side)
    encoder.enable_padding(length=length, direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                           pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)
    return encoder


CACHE_ROWS = 8192


def _cached(cache: dict, key, build):
    """cache[key], built on first use; a full cache (CACHE_ROWS) starts again, since most keys
    repeat soon."""
    if key not in cache:
        if len(cache) >= CACHE_ROWS:
            cache.clear()
        cache[key] = build()
    return cache[key]


class CaptionImageDataset(torch.utils.data.Dataset):
    """One training sample per downloaded manifest row; None when the image cannot be read."""

    def __init__(self, table: SampleTable, tokenizer, image_size: int, stage: "StageConfig", cfg, seed: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        """`stage` gives the augmentations (`crop`, `augment`) and the partners: "extra", each
        sample brings a partner image that only the mask-consistency loss sees; "in_batch", a
        sample is its image and its partner as two full samples, both trained on by every loss
        (`collate` puts the partners in the batch)."""
        self.table = table
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.partners = stage.partners
        self.seed = seed
        self.epoch = 0
        self.transform = build_transform(image_size, stage, cfg, mean, std)  # uint8 out: see normalize_images
        self._encoder = fixed_length_encoder(tokenizer, cfg.max_text_length)
        # entities repeat across captions: each prompt, answer and slot block is built once per
        # process (`_cached`, at most CACHE_ROWS of each)
        self._prompt_cache: dict[str | None, tuple[list[int], list[int], int]] = {}
        self._answer_cache: dict[tuple[str, ...], dict[str, list[int]]] = {}
        self._slots_cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.table)

    def _decode(self, index: int) -> Image.Image:
        """The sample's image, read and decoded; any error here means the image is unreadable."""
        return decode_image(read_member(self.table.shard[index], int(self.table.offset[index]),
                                        int(self.table.size[index])))

    def _image(self, image: Image.Image, rng_seed: list[int]) -> torch.Tensor:
        """The augmented image; errors here are bugs, not bad data, so they are not caught."""
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = int(np.random.SeedSequence(rng_seed).generate_state(1)[0])
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds CUDA, a cost paid per sample
            random.seed(seed)
            try:
                return self.transform(image)
            finally:
                random.setstate(state)

    def _tokens(self, text: str, offsets: bool = False) -> dict[str, Any]:
        enc = self._encoder.encode(text)
        out = {"input_ids": enc.ids, "attention_mask": enc.attention_mask}
        if offsets:
            out["offset_mapping"] = enc.offsets
        return out

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The sample (None when its image cannot be read); with partners "in_batch", a list of the
        sample and its partner (the sample alone when it has none that can be read)."""
        sid = int(self.table.sample_id[index])
        try:
            decoded = self._decode(index)
        except Exception as error:  # noqa: BLE001 - any unreadable image is skipped and counted
            log.debug("sample %d skipped: %s", sid, error)
            return None
        item = self._sample(index, self._image(decoded, [self.seed, self.epoch, sid, 0]))
        if self.partners == "in_batch":
            return self._pair(item)
        if self.partners == "extra":
            item.update(self._partner(sid))
        return item

    def _sample(self, index: int, image: torch.Tensor) -> dict[str, Any]:
        """Row `index`'s training sample around its augmented `image`."""
        sid = int(self.table.sample_id[index])
        caption = self.table.caption[index]
        enc = self._tokens(caption, offsets=True)
        question, masked = masked_question(caption, self.table.chunks[index], set(self.table.entities[index]),
                                           enc["offset_mapping"], enc["input_ids"], self.tokenizer.mask_token_id)
        answer = self._answer(masked)
        return {
            "sample_id": sid,
            "image": image,
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "question_ids": question, "question_mask": enc["attention_mask"],
            "answer_ids": answer["input_ids"], "answer_mask": answer["attention_mask"],
            "has_entity": bool(masked),
            **self._entity_prompts(masked),
        }

    def _prompt(self, entity: str | None) -> tuple[list[int], list[int], int]:
        """Token ids, attention mask and key of one entity's prompt (None: an empty slot).
        Entities repeat across captions, so each is tokenised once per process."""
        def build() -> tuple[list[int], list[int], int]:
            enc = self._tokens("" if entity is None else self.cfg.prompt_template.format(entity))
            return enc["input_ids"], enc["attention_mask"], -1 if entity is None else entity_key(entity)

        return _cached(self._prompt_cache, entity, build)

    def _answer(self, masked: list[str]) -> dict[str, list[int]]:
        """The answer prompt's tokens ("a photo of a dog and a person.")."""
        return _cached(self._answer_cache, tuple(masked),
                       lambda: self._tokens(entity_prompt(masked, self.cfg.prompt_template)))

    def _entity_prompts(self, masked: list[str]) -> dict[str, torch.Tensor]:
        """One prompt per masked entity (for the grounding loss), padded to `max_entities`
        slots; an empty slot has key -1. The tensors are shared between samples with the same
        entities: `collate` stacks them into new ones, and nothing writes into them."""
        slots = tuple(masked[:self.cfg.max_entities])

        def build() -> dict[str, torch.Tensor]:
            rows = [self._prompt(e) for e in slots] + [self._prompt(None)] * (self.cfg.max_entities - len(slots))
            return {"entity_prompt_ids": torch.tensor([ids for ids, _, _ in rows]),
                    "entity_prompt_mask": torch.tensor([mask for _, mask, _ in rows]),
                    "entity_keys": torch.tensor([key for _, _, key in rows])}

        return _cached(self._slots_cache, slots, build)

    def _draw_partner(self, sid: int) -> tuple[int | None, str, Image.Image | None]:
        """This epoch's partner of sample `sid`: its row, the shared entity and its decoded
        image (None where the sample has no partner or its image cannot be read)."""
        options = self.table.partners.get(sid, [])
        if not options:
            return None, "thing", None
        rng = np.random.default_rng([self.seed, self.epoch, sid, 1])
        partner_id, entity = options[int(rng.integers(len(options)))]
        p_index = int(np.searchsorted(self.table.sample_id, partner_id))
        try:
            return p_index, entity, self._decode(p_index)
        except Exception as error:  # noqa: BLE001
            log.debug("partner %d of %d skipped: %s", partner_id, sid, error)
            return p_index, entity, None

    def _shared(self, entity: str) -> dict[str, list[int]]:
        """The prompt naming the entity a sample shares with its partner."""
        shared_ids, shared_mask, _ = self._prompt(entity)
        return {"shared_ids": shared_ids, "shared_mask": shared_mask}

    def _pair(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The sample and its partner, both full samples that name their shared entity."""
        sid = item["sample_id"]
        p_index, entity, decoded = self._draw_partner(sid)
        shared = self._shared(entity)
        if decoded is None:
            return [{**item, **shared}]
        partner = self._sample(p_index, self._image(decoded, [self.seed, self.epoch, sid, 2]))
        return [{**item, **shared}, {**partner, **shared}]

    def _partner(self, sid: int) -> dict[str, Any]:
        _, entity, decoded = self._draw_partner(sid)
        found = decoded is not None
        image = (self._image(decoded, [self.seed, self.epoch, sid, 2]) if found
                 else torch.zeros(3, *self._image_shape(), dtype=torch.uint8))
        return {"partner_image": image, **self._shared(entity), "has_partner": found}

    def _image_shape(self) -> tuple[int, int]:
        size = self.transform.transforms[0].size
        return (size, size) if isinstance(size, int) else tuple(size)


# token id columns and the attention mask that says which of their positions are real
TEXT_FIELDS = (("input_ids", "attention_mask"), ("question_ids", "question_mask"), ("answer_ids", "answer_mask"),
               ("shared_ids", "shared_mask"), ("entity_prompt_ids", "entity_prompt_mask"))


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop the trailing positions that are padding in every row of a text field: the samples
    are padded to `max_text_length`, most captions are far shorter, and the encoders' cost
    grows with the length. Real tokens and their outputs are unchanged (padding is masked)."""
    for ids, mask in TEXT_FIELDS:
        if ids not in batch:
            continue
        real = batch[mask].flatten(0, -2).any(dim=0)  # (L,): a real token in some row
        length = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
        batch[ids] = batch[ids][..., :length].contiguous()
        batch[mask] = batch[mask][..., :length].contiguous()
    return batch


def collate(items: list[dict | list[dict] | None]) -> dict[str, Any]:
    """Stack the readable samples (text trimmed to its longest row, see `trim_padding`);
    `n_skipped` counts the unreadable ones. Pairs (lists, see `CaptionImageDataset`) go in as
    rows of their own: the samples first, then the partners, with `partner_index` giving each
    row's partner row (-1: none) and `has_partner` saying whether it has one."""
    if any(isinstance(item, list) for item in items):
        return _collate_pairs(items)
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"n_skipped": len(items) - len(kept), "n_items": len(items)}
    if not kept:
        return batch
    for key in kept[0]:
        values = [item[key] for item in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    return trim_padding(batch)


def _collate_pairs(items: list[list[dict] | None]) -> dict[str, Any]:
    kept = [pair for pair in items if pair is not None]
    samples = [pair[0] for pair in kept]
    partners = [pair[1] for pair in kept if len(pair) > 1]
    index = [-1] * (len(samples) + len(partners))
    row = len(samples)
    for i, pair in enumerate(kept):
        if len(pair) > 1:
            index[i], index[row] = row, i
            row += 1
    rows = [{**sample, "partner_index": p, "has_partner": p >= 0} for sample, p in zip(samples + partners, index)]
    batch = collate(rows)
    batch.update(n_skipped=len(items) - len(kept), n_items=len(items))
    return batch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, split across ranks, that can start mid-epoch.

    Like DistributedSampler (padding by wrap-around so every rank gets the same count), plus
    `start`: the number of this rank's samples already consumed in the epoch (for resume)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order = (order * (total // max(len(order), 1) + 1))[:total]
        mine = order[self.rank:total:self.world_size]
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def seed_worker(worker_id: int) -> None:
    """Workers take their seeds from torch's per-worker seed (numpy and random too)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: CaptionImageDataset, sampler: ResumableSampler, batch_size: int,
                num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate, pin_memory=pin_memory, drop_last=True,
        persistent_workers=num_workers > 0, worker_init_fn=seed_worker,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: making an iterator must not draw from the global RNG, or a resumed
        # run (one more iterator) would see different Gumbel noise than an uninterrupted one
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def captions_for_tokenizer(data_dir: str, limit: int = 200_000) -> Iterator[str]:
    """Captions of the manifest (at most `limit`), to train a WordPiece tokenizer on."""
    fs, path = fsspec.core.url_to_fs(str(data_dir))
    dataset = pads.dataset(join(path, MANIFEST_DIR), format="parquet", filesystem=fs)
    seen = 0
    for batch in dataset.to_batches(columns=["caption"]):
        for caption in batch.column(0).to_pylist():
            yield caption
            seen += 1
            if seen >= limit:
                return


def data_dir_exists(data_dir: str) -> bool:
    fs, path = fsspec.core.url_to_fs(str(data_dir))
    return fs.exists(join(path, DOWNLOADS_FILE)) and fs.exists(join(path, MANIFEST_DIR))

