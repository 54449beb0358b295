"""Projectors into the shared image-text space (the paper: 2 layers, 4096 hidden, 256 out).

As in GroupViT's and OVSegmentor's public code the hidden layer is batch-normalised: two towers
trained from scratch start with nearly identical outputs for every input, and the contrastive
loss has a stationary point where all embeddings coincide (its gradient is then zero); without
batch normalisation both towers fall into it within a few steps and the loss stays at log(B).

`sync_stats` (off by default; `set_sync_stats`) normalises with the statistics of every rank's
rows, as the official code's SyncBN does, on any backend (gloo too), with gradients through
the statistics to every rank. Every rank must then call each projector the same number of times.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, dim_out)
        self.sync_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C_in) -> (..., C_out); batch statistics over every leading dimension (and over
        every rank with `sync_stats`)."""
        shape = x.shape
        h = self.fc1(x.reshape(-1, shape[-1]))
        if self.training and self.sync_stats and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            h = global_batch_norm(h, self.norm)
        elif self.training and h.shape[0] == 1:
            # one row has no batch statistics: normalise it with the running ones
            h = F.batch_norm(h, self.norm.running_mean, self.norm.running_var, self.norm.weight, self.norm.bias,
                             training=False, eps=self.norm.eps)
        else:
            h = self.norm(h)
        return self.fc2(self.act(h)).reshape(*shape[:-1], -1)


def global_batch_norm(h: torch.Tensor, norm: nn.BatchNorm1d) -> torch.Tensor:
    """h (N, C) normalised with the mean and variance of every rank's rows (gathered with
    gradients), `norm`'s affine applied and its running statistics moved as one batch of all the
    rows would move them. Per-rank means and variances are combined (not sums of squares), which
    keeps the variance accurate when the mean is large. A rank may hold no rows."""
    from torch.distributed.nn.functional import all_gather

    n = h.new_tensor([float(h.shape[0])])
    count = n.clamp_min(1.0)
    mean = h.sum(0) / count  # (C,)
    var = (h - mean).pow(2).sum(0) / count
    gathered = all_gather(torch.cat([n, mean, var]))  # a (1 + 2C,) row per rank
    stats = torch.stack(gathered)  # (R, 1 + 2C)
    c = h.shape[1]
    counts, means, variances = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    g_var = (counts * (variances + (means - g_mean).pow(2))).sum(0) / total  # biased, as batch norm normalises
    if norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            m = norm.momentum if norm.momentum is not None else 0.1
            norm.running_mean.mul_(1 - m).add_(g_mean.detach(), alpha=m)
            norm.running_var.mul_(1 - m).add_(g_var.detach() * total / (total - 1).clamp_min(1.0), alpha=m)
            norm.num_batches_tracked.add_(1)
    out = (h - g_mean) * torch.rsqrt(g_var + norm.eps)
    return out * norm.weight + norm.bias if norm.affine else out


def set_sync_stats(model: nn.Module, on: bool = True) -> None:
    """Every projector of the model normalises with the statistics of all ranks (or not)."""
    for module in model.modules():
        if isinstance(module, Projector):
            module.sync_stats = on
