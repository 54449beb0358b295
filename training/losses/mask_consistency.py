"""Cross-image mask consistency: two images that share an entity should split that entity
alike. The image's group queries are applied to its partner's patch tokens; the resulting
masks are matched (Hungarian, on dice cost) to the partner's own group masks from the momentum
encoder and trained with a dice loss against the thresholded target. Only the groups most
related to the shared entity receive the loss (as the public code does).

`matching="entity"` (ovseg's change) matches those groups only to the partner's groups most
related to the shared entity, instead of to whichever of all its groups their masks overlap
most. On the synthetic world, in the paper's form, 26% of the targets were the shared object;
with one group kept, entity matching and the token grid (`model.mask_grid`), 67%
(`ovseg bench mask-targets`, docs/quality.md section 11)."""

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


MATCHINGS = ("dice", "entity")


class MaskConsistencyLoss(nn.Module):
    def __init__(self, keep_groups: int = 4, threshold: float = 0.5, matching: str = "dice"):
        super().__init__()
        if matching not in MATCHINGS:
            raise ValueError(f"unknown mask matching {matching!r}; choose from {', '.join(MATCHINGS)}")
        self.keep_groups = keep_groups
        self.threshold = threshold
        self.matching = matching

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, relevance: torch.Tensor,
                has_partner: torch.Tensor, partner_relevance: torch.Tensor | None = None) -> torch.Tensor:
        """student (B, K, N): the image's group masks on the partner's patches; teacher
        (B, K, N): the partner's own masks (momentum encoder, no gradient); relevance (B, K):
        how related each of the image's groups is to the shared entity; has_partner (B,);
        partner_relevance (B, K): the same for the partner's groups (needed by entity matching)."""
        index = has_partner.nonzero(as_tuple=True)[0]
        if index.numel() == 0:
            return student.sum() * 0.0  # keeps the graph connected for DDP
        _, student, target = self.pairs(student[index], teacher[index], relevance[index],
                                        None if partner_relevance is None else partner_relevance[index])
        return dice_loss(student, target).mean()

    def pairs(self, student: torch.Tensor, teacher: torch.Tensor, relevance: torch.Tensor,
              partner_relevance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the loss compares, for P pairs (arguments as in `forward`): the kept groups'
        indices (P, keep), their masks on the partner (P, keep, N) and the binary targets
        they are matched to (P, keep, N)."""
        target = (teacher.detach() > self.threshold).to(student.dtype)  # (P, K, N)
        # only the groups most related to the shared entity get the loss (and a gradient)
        n_keep = min(self.keep_groups, student.shape[1])
        keep = relevance.topk(n_keep, dim=1).indices  # (P, keep)
        if self.matching == "entity":
            if partner_relevance is None:
                raise ValueError("entity matching needs the partner's relevance to the shared entity")
            # the kept groups against the partner's groups most related to the entity
            candidates = partner_relevance.topk(n_keep, dim=1).indices  # (P, keep)
            student, target = _rows(student, keep), _rows(target, candidates)  # (P, keep, N) each
        # Hungarian matching on dice cost (dice: every group of the image to the partner's, then
        # the kept ones are taken): one transfer to the CPU for the whole batch
        cost = pairwise_dice_cost(student.detach().float(), target.float()).cpu().numpy()
        match = np.stack([linear_sum_assignment(c)[1] for c in cost])  # row i -> target match[:, i]
        matched = _rows(target, torch.as_tensor(match, device=student.device))
        if self.matching == "dice":
            student, matched = _rows(student, keep), _rows(matched, keep)
        return keep, student, matched
