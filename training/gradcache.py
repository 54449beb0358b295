"""Exact large-batch gradients at the memory of a micro-batch: gradient caching (Gao et al.,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021), for a model
whose every loss reads the whole batch.

Plain gradient accumulation over k micro-batches is not a batch k times the size: each
micro-batch's contrastive loss sees only its own negatives. `cached_step` gives the gradient
of the whole step's loss, exactly as one batch of the k micro-batches would, in three passes:

1. every micro-batch through `model.embed` without a graph (the per-sample parts: group tokens,
   sentence features, decoded questions, cross-image masks);
2. the parts joined into one batch, as leaves that require grad, through `model.batch_losses`
   (the projectors with the whole step's batch norm statistics, the contrastive and entity
   negatives all-gathered across ranks, the grounding's entities of the whole step, the mask
   loss's mean), and its backward: the parameters read there (projectors, logit scale,
   grounding scale and bias, the decoder's projector) get their gradient directly, the parts
   theirs;
3. every micro-batch through `model.embed` again, with the graph and the same per-sample noise
   (`training/model/noise.py`), and the cached gradients of its parts back-propagated.

The cost is one extra forward pass of the encoders per step (pass 1), and the memory that of a
micro-batch's graph plus the parts of the whole step (small: a few vectors per sample).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ovseg.training.model import noise
from ovseg.training.model.ovsegmentor import _first_occurrences

# the parts `embed` returns that carry a gradient back into the encoders
GRAD_KEYS = ("groups", "caption", "answer", "decoded", "area", "entity_features", "student")
ENTITY_KEYS = ("entity_ids", "entity_features")  # one row per distinct entity, not per sample

log = logging.getLogger(__name__)


def split_batch(batch: dict, k: int) -> list[dict]:
    """k micro-batches of a collated batch, its rows in order (the first micro-batch the first
    rows). A batch with `partner_index` (pairs in the batch: the samples, then their partners)
    is split by pairs, each micro-batch again its samples then their partners, so that a
    sample's partner is in its micro-batch; `partner_index` is renumbered. Entries that are not
    per-row tensors (`n_items`, ...) are copied."""
    rows = _row_count(batch)
    if k < 1 or k > rows:
        raise ValueError(f"cannot split a batch of {rows} rows into {k} micro-batches")
    if "partner_index" in batch:
        return [_take(batch, chunk, rows) for chunk in _pair_chunks(batch["partner_index"], k)]
    return [_take(batch, chunk, rows) for chunk in torch.arange(rows).tensor_split(k)]


def cached_step(model, micro_batches: Sequence[dict], step_seed: int, seeds: Sequence[torch.Tensor] | None = None,
                scaler=None) -> dict[str, torch.Tensor]:
    """Accumulate into the parameters' `.grad` the gradient of the whole step's loss (the k
    `micro_batches` as one batch; on each rank its share, the contrastive and entity losses
    all-gathered as usual) and return the step's losses, detached.

    `model`: the OVSegmentor itself (not a DDP wrapper: average the gradients over ranks after,
    `training.distributed.average_gradients`), in training mode. `step_seed`: the step's seed;
    each row's noise comes from it and the row's `sample_id` (`noise.batch_seeds`), or from
    `seeds` (one (B,) int64 tensor per micro-batch). `scaler`: a GradScaler, whose scale
    multiplies the loss (AMP); autocast, if any, is the caller's, around this call."""
    if not micro_batches:
        raise ValueError("cached_step needs at least one micro-batch")
    if not hasattr(model, "embed"):
        raise ValueError("cached_step needs the model itself (a DDP wrapper's .module): "
                         "it calls embed and batch_losses")
    if seeds is None:
        seeds = [noise.batch_seeds(batch, step_seed) for batch in micro_batches]
    norms = _encoder_batch_norms(model)
    if norms and not _warned:
        _warn_inexact(norms)
    # 1. the per-sample parts of every micro-batch, without a graph (batch norm inside an
    # encoder moves its running statistics in pass 3 only)
    saved = [(buffer, buffer.clone()) for m in norms for buffer in m.buffers()]  # running statistics
    parts = []
    with torch.no_grad():
        for batch, rows in zip(micro_batches, seeds):
            with noise.per_sample(rows, step_seed):
                parts.append(model.embed(batch))
        for buffer, value in saved:
            buffer.copy_(value)
    # 2. the whole step's losses over the joined parts, and their gradients
    joined, where = _join(parts)
    leaves = {key: joined[key].detach().requires_grad_() for key in GRAD_KEYS
              if key in joined and joined[key].is_floating_point()}
    losses = model.batch_losses({**joined, **leaves})
    total = losses["loss"] if scaler is None else scaler.scale(losses["loss"])
    total.backward()
    # 3. each micro-batch again, with its graph and the same noise, fed its parts' gradients
    for j, (batch, rows) in enumerate(zip(micro_batches, seeds)):
        with noise.per_sample(rows, step_seed):
            again = model.embed(batch, reuse=parts[j])  # the teacher's parts (no gradient) from pass 1
        outputs, grads = [], []
        for key, leaf in leaves.items():
            if leaf.grad is None or not again[key].requires_grad:
                continue
            outputs.append(again[key])
            grads.append(_slice_grad(key, leaf.grad, where, j, again[key]))
        if outputs:
            torch.autograd.backward(outputs, grads)
    return {name: value.detach() for name, value in losses.items()}


_warned = False


def _encoder_batch_norms(model) -> list:
    """Batch norms in training mode outside the projectors (the projectors run over the whole
    step in pass 2; these normalise each micro-batch alone)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from ovseg.training.model.projector import Projector

    inside = {id(m) for p in model.modules() if isinstance(p, Projector) for m in p.modules()}
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and id(m) not in inside]


def _warn_inexact(norms: list) -> None:
    global _warned
    _warned = True
    log.warning("gradient caching is not exact for this model: %d batch norm layer(s) inside the encoders "
                "(e.g. model.patch_embed=cnn) normalise each micro-batch with its own statistics", len(norms))


# -- joining and splitting ------------------------------------------------------------------------

def _row_count(batch: dict) -> int:
    return int(batch["image"].shape[0])


def _take(batch: dict, index: torch.Tensor, rows: int) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    if "partner_index" in batch:  # old row -> new row
        new = torch.full((rows,), -1, dtype=torch.long)
        new[index] = torch.arange(index.numel())
        old = batch["partner_index"][index.to(batch["partner_index"].device)].cpu()
        out["partner_index"] = torch.where(old >= 0, new[old.clamp(min=0)], old).to(batch["partner_index"].device)
    return out


def _pair_chunks(partner_index: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Row indices per micro-batch: the samples (rows that are no partner of an earlier row) in
    k contiguous runs, each followed by their partners."""
    partner = partner_index.cpu().tolist()
    samples = [i for i, p in enumerate(partner) if p < 0 or p > i]
    chunks = []
    for run in torch.tensor(samples).tensor_split(k):
        run = run.tolist()
        chunks.append(torch.tensor(run + [partner[i] for i in run if partner[i] > i], dtype=torch.long))
    return chunks


def _join(parts: list[dict]) -> tuple[dict, dict]:
    """The micro-batches' parts as one batch's: rows concatenated, partner rows offset, the
    distinct entities of the whole step (each from the first micro-batch that has it). Also
    where each micro-batch's rows and entities landed."""
    joined: dict = {}
    sizes = [part["groups"].shape[0] for part in parts]
    starts = [sum(sizes[:j]) for j in range(len(parts))]
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key in ENTITY_KEYS or key == "keys":  # keys: the official mask loss's, for pass 3 only
            continue
        if key == "mask_size":
            joined[key] = values[0]
        elif key == "partner_index":
            joined[key] = torch.cat([v + start for v, start in zip(values, starts)])
        else:
            joined[key] = torch.cat(values)
    where: dict = {"starts": starts, "sizes": sizes}
    if "entity_ids" in parts[0]:
        ids = torch.cat([part["entity_ids"] for part in parts])  # (sum U_j,)
        features = torch.cat([part["entity_features"] for part in parts])
        unique, first = _first_occurrences(ids)
        joined["entity_ids"], joined["entity_features"] = unique, features[first]
        counts = [part["entity_ids"].numel() for part in parts]
        where["entity_first"] = first  # (U,): position of each distinct entity among the concatenated ones
        where["entity_starts"] = [sum(counts[:j]) for j in range(len(parts))]
        where["entity_counts"] = counts
    return joined, where


def _slice_grad(key: str, grad: torch.Tensor, where: dict, j: int, like: torch.Tensor) -> torch.Tensor:
    """Micro-batch j's share of a joined part's gradient (an entity's goes to the micro-batch
    whose copy of it was used, the others get zero)."""
    if key == "entity_features":
        first, start, count = where["entity_first"], where["entity_starts"][j], where["entity_counts"][j]
        out = torch.zeros_like(like)
        mine = (first >= start) & (first < start + count)
        out[first[mine] - start] = grad[mine].to(out.dtype)
        return out
    start, size = where["starts"][j], where["sizes"][j]
    return grad[start:start + size].to(like.dtype)
