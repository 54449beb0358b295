"""Cross-image mask consistency: two images that share an entity should split that entity
alike. The image's group queries are applied to its partner's patch tokens; the resulting
masks are matched (Hungarian, on dice cost) to the partner's own group masks from the momentum
encoder and trained with a dice loss against the thresholded target. Only the groups most
related to the shared entity receive the loss (as the public code does)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 |p t| + s) / (|p| + |t| + s) over the last dim."""
    inter = (pred * target).sum(-1)
    return 1 - (2 * inter + smooth) / (pred.sum(-1) + target.sum(-1) + smooth)


def pairwise_dice_cost(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """(..., K, N) x (..., K, N) -> (..., K, K) dice losses between every pred row and every
    target row."""
    inter = pred @ target.transpose(-1, -2)
    return 1 - (2 * inter + smooth) / (pred.sum(-1)[..., :, None] + target.sum(-1)[..., None, :] + smooth)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (P, K, N), index (P, J) -> (P, J, N): the chosen rows of each sample."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class MaskConsistencyLoss(nn.Module):
    def __init__(self, keep_groups: int = 4, threshold: float = 0.5):
        super().__init__()
        self.keep_groups = keep_groups
        self.threshold = threshold

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, relevance: torch.Tensor,
                has_partner: torch.Tensor) -> torch.Tensor:
        """student (B, K, N): the image's group masks on the partner's patches; teacher
        (B, K, N): the partner's own masks (momentum encoder, no gradient); relevance (B, K):
        how related each of the image's groups is to the shared entity; has_partner (B,)."""
        index = has_partner.nonzero(as_tuple=True)[0]
        if index.numel() == 0:
            return student.sum() * 0.0  # keeps the graph connected for DDP
        student, relevance = student[index], relevance[index]  # (P, K, N), (P, K)
        target = (teacher[index].detach() > self.threshold).to(student.dtype)  # (P, K, N)
        # Hungarian matching of the image's groups to the partner's, on dice cost: one transfer
        # to the CPU for the whole batch
        cost = pairwise_dice_cost(student.detach().float(), target.float()).cpu().numpy()  # (P, K, K)
        match = np.stack([linear_sum_assignment(c)[1] for c in cost])  # row i -> target match[:, i]
        matched = _rows(target, torch.as_tensor(match, device=student.device))  # (P, K, N)
        # only the groups most related to the shared entity get the loss (and a gradient)
        keep = relevance.topk(min(self.keep_groups, student.shape[1]), dim=1).indices  # (P, keep)
        return dice_loss(_rows(student, keep), _rows(matched, keep)).mean()
