"""Cross-image mask consistency: two images that share an entity should split that entity
alike. The image's group queries are applied to its partner's patch tokens; the resulting
masks are matched (Hungarian, on dice cost) to the partner's own group masks from the momentum
encoder and trained with a dice loss against the thresholded target. Only the groups most
related to the shared entity receive the loss (as the public code does)."""

from __future__ import annotations

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 |p t| + s) / (|p| + |t| + s) over the last dim."""
    inter = (pred * target).sum(-1)
    return 1 - (2 * inter + smooth) / (pred.sum(-1) + target.sum(-1) + smooth)


def pairwise_dice_cost(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """(K, N) x (K, N) -> (K, K) dice losses between every pred row and every target row."""
    inter = pred @ target.T
    return 1 - (2 * inter + smooth) / (pred.sum(-1)[:, None] + target.sum(-1)[None, :] + smooth)


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
        target = (teacher.detach() > self.threshold).float()
        keep = min(self.keep_groups, student.shape[1])
        losses = []
        for b in torch.nonzero(has_partner, as_tuple=False).flatten().tolist():
            cost = pairwise_dice_cost(student[b].detach().float(), target[b].float())
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            match = torch.as_tensor(cols[rows.argsort()], device=student.device)  # row i -> target match[i]
            chosen = relevance[b].topk(keep).indices  # the groups that get the loss
            losses.append(dice_loss(student[b, chosen], target[b, match[chosen]]).mean())
        if not losses:
            return student.sum() * 0.0
        return torch.stack(losses).mean()
