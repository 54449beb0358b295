"""Cross-image mask consistency: two images that share an entity should split that entity
alike. The image's group queries are applied to its partner's patches; the resulting masks
are matched (Hungarian) to the partner's own group masks from the momentum encoder and trained
with a dice loss against the thresholded target.

Two forms (`model.mask_form`):
- "official" (`OfficialMaskConsistencyLoss`), the public code's `mask_loss`: raw assignment
  logits upsampled to the input; the groups least related to the shared entity detached
  (bottom `group_ratio` of them), so they get no gradient but still take part in the
  matching; Hungarian matching on the L2 distance of the L2-normalised flattened masks;
  targets: sigmoid of the matched teacher logits, 1 where at least `threshold` x the mask's
  maximum; student: min-max normalised per mask; dice (+1 smoothing) per sample over all its
  matched masks flattened together, summed over the samples and divided by K.
- "ovseg" (`MaskConsistencyLoss`): softmax masks over the groups, an absolute target
  threshold, dice-cost matching, per-mask mean dice, only the groups most related to the shared
  entity (`keep_groups`).

`matching="entity"` (ovseg's change) matches those groups only to the partner's groups most
related to the shared entity, instead of to whichever of all its groups their masks overlap
most: the paper's form keeps several groups, most of them background, whose partner targets a
group's mask on another image cannot draw. `ovseg bench mask-targets` measures how much of
the kept groups and of their targets lies on the shared object, under either setting."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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


# -- the official form ---------------------------------------------------------------------------

def min_max_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(x - min) / (max - min) over the last dim. `eps` only keeps a constant mask finite (the
    official divides by zero there)."""
    low = x.min(dim=-1, keepdim=True).values
    high = x.max(dim=-1, keepdim=True).values
    return (x - low) / (high - low).clamp_min(eps)


def relative_targets(teacher_logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Binary targets (..., N) from logits (..., N): sigmoid, then 1 where the value is at least
    `ratio` x the mask's maximum (>= gives 1)."""
    prob = teacher_logits.sigmoid()
    return (prob >= ratio * prob.max(dim=-1, keepdim=True).values).to(teacher_logits.dtype)


def sample_dice_loss(pred: torch.Tensor, target: torch.Tensor, num_masks: int) -> torch.Tensor:
    """pred, target (P, K, N): one dice (+1 smoothing) per sample over its K masks flattened
    together, summed over the samples and divided by `num_masks`."""
    pred, target = pred.flatten(1), target.flatten(1)  # (P, K N)
    per_sample = 1 - (2 * (pred * target).sum(-1) + 1) / (pred.sum(-1) + target.sum(-1) + 1)
    return per_sample.sum() / num_masks


@torch.no_grad()
def l2_matching(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """student, teacher (P, K, N) -> (P, K): the teacher mask matched to each student mask, by
    Hungarian matching on the L2 distance of the L2-normalised masks (one CPU transfer)."""
    cost = torch.cdist(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1))  # (P, K, K)
    cost = cost.cpu().numpy()
    match = np.stack([linear_sum_assignment(c)[1] for c in cost])
    return torch.as_tensor(match, device=student.device, dtype=torch.long)


def detach_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (P, K, ...) with the rows `rows` (P, J) of each sample cut from the graph (their values
    kept)."""
    frozen = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    frozen.scatter_(1, rows, True)
    frozen = frozen.view(*x.shape[:2], *([1] * (x.ndim - 2)))
    return torch.where(frozen, x.detach(), x)


class OfficialMaskConsistencyLoss(nn.Module):
    def __init__(self, group_ratio: float = 0.5, threshold: float = 0.6):
        super().__init__()
        self.group_ratio = group_ratio
        self.threshold = threshold

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, relevance: torch.Tensor,
                has_partner: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """student (B, K, h, w): the image's assignment logits on its partner's momentum keys
        (with gradient); teacher (B, K, h, w): the partner's own momentum logits; relevance
        (B, K): each of the image's groups against the shared entity; has_partner (B,); size:
        the input size the masks are upsampled to (None: as they are)."""
        index = has_partner.nonzero(as_tuple=True)[0]
        if index.numel() == 0:
            return student.sum() * 0.0  # keeps the graph connected for DDP
        student, target = self.pairs(student[index], teacher[index], relevance[index], size)
        return sample_dice_loss(min_max_normalise(student), target, student.shape[1])

    def pairs(self, student: torch.Tensor, teacher: torch.Tensor, relevance: torch.Tensor,
              size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The flattened student logits (P, K, H W), the least related groups detached, and the
        binary targets matched to them (P, K, H W)."""
        student, teacher = student.float(), teacher.detach().float()
        if size is not None and tuple(size) != tuple(student.shape[-2:]):
            student = F.interpolate(student, size=size, mode="bilinear", align_corners=True)
            teacher = F.interpolate(teacher, size=size, mode="bilinear", align_corners=True)
        k = student.shape[1]
        frozen = relevance.topk(int(k * self.group_ratio), dim=1, largest=False).indices  # (P, J)
        student = detach_rows(student, frozen).flatten(2)  # (P, K, H W)
        teacher = teacher.flatten(2)
        match = l2_matching(student.detach(), teacher)  # (P, K)
        return student, relative_targets(_rows(teacher, match), self.threshold)
