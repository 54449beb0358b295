"""Image-caption contrastive loss: symmetric InfoNCE over the global batch.

Every rank gathers the other ranks' embeddings with gradients (`torch.distributed.nn`) and
scores its own rows against the whole global batch; averaged over ranks (DDP's gradient mean)
this is exactly the loss of one process holding the concatenated batch. With world size 1 the
gather is the identity."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping the autograd graph."""
    _, world = _world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated for a private API; still the public autograd gather
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between normalised a (B, D) and b (B, D): row i of a matches row i of
    b. `valid` (B,) drops samples from both sides (rows and negatives)."""
    rank, _ = _world()
    n = a.shape[0]
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(n, device=a.device) + rank * n
    logits_ab = logit_scale * a @ all_b.T  # (B, B_global)
    logits_ba = logit_scale * b @ all_a.T
    if valid is None:
        return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
    all_valid = gather_with_grad(valid.float()).bool()
    local = valid.bool()
    if not bool(all_valid.any()):
        return (a.sum() + b.sum()) * 0.0  # keeps the graph connected for DDP
    blocked = torch.finfo(logits_ab.dtype).min
    logits_ab = logits_ab.masked_fill(~all_valid[None, :], blocked)
    logits_ba = logits_ba.masked_fill(~all_valid[None, :], blocked)
    rows = local.nonzero(as_tuple=True)[0]  # only this rank's valid rows are scored
    per_row = 0.5 * (F.cross_entropy(logits_ab[rows], labels[rows], reduction="none")
                     + F.cross_entropy(logits_ba[rows], labels[rows], reduction="none"))
    # mean over the valid rows of the global batch, so ranks with fewer valid rows weigh less
    _, world = _world()
    return per_row.sum() * world / all_valid.sum()
