"""Per-sample seeded noise: the model's Gumbel noise, dropout and drop path drawn from each
sample's own seed, so that a sample's noise does not depend on its batch, micro-batch, row or
rank (gradient caching re-runs a micro-batch and must see the same noise; 2 GPUs with 4
micro-batches must see what 8 GPUs see).

A value is a counter-based hash of (row seed, the module's salt, the element's coordinates):
lowbias32 (a 32-bit integer mixer) chained over each coordinate, in int64 tensor ops. Each
coordinate is hashed on its own, not the flat index, so an element keeps its value when the
other dimensions change (a text's attention weights keep theirs when the batch is padded
further). Without the `per_sample` context every site draws from the global RNG as before.

    seeds = noise.batch_seeds(batch, step_seed)   # (B,) int64
    with noise.per_sample(seeds, step_seed):
        losses = model(batch)

`install(model)` puts seeded dropout and drop path in place of nn.Dropout and timm's DropPath,
gives every module a salt from its qualified name (the momentum encoder's differ from the
image encoder's) and routes the transformers text encoder's attention through a function that
draws its attention-probability dropout the same way. `build_model` calls it.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

M32 = 0xFFFFFFFF
# tags that derive one call's row seeds from the sample's (each encoder call sees other noise)
TAGS = {name: zlib.crc32(name.encode()) for name in
        ("image", "partner", "caption", "question", "answer", "shared", "entity", "partner_row")}


@dataclass(frozen=True)
class _State:
    seeds: torch.Tensor  # (B,) int64: one seed per row of the tensors the sites see
    step: int            # the step's seed (for noise keyed by something other than a row)


_state: _State | None = None


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64 (products wrap mod 2**64; their low 32 bits are
    the uint32 product)."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def mix_seeds(seeds: torch.Tensor, value: int) -> torch.Tensor:
    """New 32-bit seeds (B,) from int64 seeds (B,) and a 64-bit integer (a tag, a salt, a step
    seed): every bit of both counts."""
    seeds = seeds.to(torch.int64)
    value = int(value)
    key = _mix(torch.full_like(seeds, value & M32) ^ _mix(torch.full_like(seeds, (value >> 32) & M32)))
    return _mix(_mix(seeds ^ key) ^ ((seeds >> 32) & M32))


def batch_seeds(batch: dict, step_seed: int) -> torch.Tensor:
    """(B,) seeds from the batch's `sample_id` and the step's seed. A row that is another
    sample's partner (`partner_index` batches: the partners come after the samples) gets its
    own, so a sample that is also a partner in the same batch sees other noise."""
    if "sample_id" not in batch:
        raise ValueError("per-sample noise needs the batch's sample_id (or pass the seeds yourself)")
    ids = torch.as_tensor(batch["sample_id"]).to(torch.int64).cpu()
    seeds = mix_seeds(ids, step_seed)
    if "partner_index" in batch:
        partner = torch.as_tensor(batch["partner_index"]).cpu()
        is_partner = (partner >= 0) & (partner < torch.arange(ids.numel()))
        seeds = torch.where(is_partner, mix_seeds(seeds, TAGS["partner_row"]), seeds)
    return seeds


@contextlib.contextmanager
def per_sample(seeds: torch.Tensor, step: int = 0):
    """Draw the model's noise from these row seeds (B,) inside the block."""
    global _state
    previous = _state
    _state = _State(torch.as_tensor(seeds).to(torch.int64), int(step))
    try:
        yield
    finally:
        _state = previous


def active() -> bool:
    return _state is not None


def derived(tag: str):
    """A context whose row seeds are the current ones mixed with `tag` (another encoder call on
    the same rows sees other noise); does nothing outside `per_sample`."""
    if _state is None:
        return contextlib.nullcontext()
    return per_sample(mix_seeds(_state.seeds, TAGS[tag]), _state.step)


def keyed(tag: str, keys: torch.Tensor):
    """A context whose row seeds come from `keys` (B,) (e.g. an entity's id) and the step's
    seed, not from a sample: the same key gets the same noise in any batch of the step."""
    if _state is None:
        return contextlib.nullcontext()
    keys = keys.to(torch.int64).cpu()
    return per_sample(mix_seeds(mix_seeds(keys, _state.step), TAGS[tag]), _state.step)


def uniform(shape: torch.Size | tuple[int, ...], salt: int, device=None) -> torch.Tensor:
    """Uniform values in (0, 1), float32, of `shape` (B, ...): row b from the active row seed b,
    each element from its coordinates. Only inside `per_sample`."""
    if _state is None:
        raise RuntimeError("noise.uniform needs the per_sample context")
    seeds = _state.seeds
    if shape[0] != seeds.shape[0]:
        raise ValueError(f"a noise site sees {shape[0]} rows but the per-sample context holds {seeds.shape[0]} seeds")
    h = mix_seeds(seeds, salt).to(device)  # (B,)
    h = h.view(-1, *([1] * (len(shape) - 1)))
    for dim, n in enumerate(shape[1:], start=1):
        view = [1] * len(shape)
        view[dim] = n
        h = _mix(h ^ _mix(torch.arange(n, device=device, dtype=torch.int64).view(view) + dim * 0x9E3779B9))
    return unit_interval(h.expand(shape))


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64) as float32 values strictly inside (0, 1): their top 23 bits v as
    (v + 0.5) / 2**23, which float32 holds exactly (24 significant bits). With 24 bits the
    largest, (2**24 - 0.5) / 2**24, rounds to 1.0, whose Gumbel noise is infinite."""
    return ((h >> 9).to(torch.float32) + 0.5) / 8388608.0


def gumbel(logits: torch.Tensor, salt: int) -> torch.Tensor:
    """Gumbel(0, 1) noise like `logits`, float32: per sample inside `per_sample`, else from the
    global RNG (as the model always drew it)."""
    if _state is None:
        return -torch.empty_like(logits, dtype=torch.float32).exponential_().log()
    return -(-uniform(logits.shape, salt, logits.device).log()).log()


def _keep_mask(x: torch.Tensor, p: float, salt: int, shape=None) -> torch.Tensor:
    keep = uniform(shape or x.shape, salt, x.device) >= p
    return keep.to(x.dtype) / (1.0 - p)


class SeededDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn per sample inside `per_sample` (dim 0 is the row)."""
    salt = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _state is None or not self.training or self.p == 0:
            return super().forward(x)
        if self.p >= 1:
            return x * 0.0
        return x * _keep_mask(x, self.p, self.salt)


class SeededDropPath(nn.Module):
    """timm's DropPath (a whole residual branch dropped per sample), seeded per sample inside
    `per_sample`."""
    salt = 0

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers import drop_path

        if _state is None or not self.training or self.drop_prob == 0:
            return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
        keep = uniform((x.shape[0],), self.salt, x.device) >= self.drop_prob  # (B,)
        mask = keep.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if self.scale_by_keep and self.drop_prob < 1:
            mask = mask / (1.0 - self.drop_prob)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


ATTENTION = "ovseg_seeded"


def _seeded_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention (B, h, L, d) that delegates to the implementation the encoder had
    (sdpa) unless per-sample noise is on and dropout is positive; then eager attention with the
    dropout mask drawn per sample (the mask comes in sdpa's form: bool, additive or None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _state is None or not dropout:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = (query @ key.transpose(2, 3)) * scaling  # (B, h, Lq, Lk)
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
    if attention_mask is None and is_causal and query.shape[2] > 1:
        lq, lk = query.shape[2], key.shape[2]
        attention_mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = weights.softmax(dim=-1) * _keep_mask(weights, dropout, getattr(module, "noise_salt", 0))
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _register_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, _seeded_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def _salt(name: str) -> int:
    return zlib.crc32(name.encode())


def install(model: nn.Module) -> nn.Module:
    """Seeded dropout and drop path in place of nn.Dropout and timm's DropPath (same
    probabilities, no parameters: state dicts are unchanged), a salt on every module, and the
    seeded attention for transformers encoders that use sdpa. Outside `per_sample` nothing
    changes. Returns the model."""
    from timm.layers import DropPath

    for name, module in list(model.named_modules()):
        module.noise_salt = _salt(name)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Dropout:
                new = SeededDropout(child.p, child.inplace)
            elif type(child) is DropPath:
                new = SeededDropPath(child.drop_prob, child.scale_by_keep)
            else:
                continue
            new.salt = _salt(full)
            new.train(child.training)
            setattr(module, child_name, new)
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa" \
                and hasattr(module, "set_attn_implementation"):
            _register_attention()
            module.set_attn_implementation(ATTENTION)
    return model
