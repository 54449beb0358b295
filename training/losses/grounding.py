"""Group grounding: every masked entity of the caption must be found in one group of the image.

This is how the masked entities reach single groups. For each image and each entity named in
the batch, the entity's prompt embedding is compared with every group embedding; the groups'
cosine similarities are pooled by a soft maximum weighted by each group's area (so a group that
holds no patches cannot answer), and the pooled score, through a learned scale and bias, is
the logit of "this image shows the entity". Entities the caption names are positives, the
batch's other entities negatives (binary cross-entropy, as in multiple-instance learning).
Without it the class of an object lives in the mean of the groups, not in the group that
covers it, and zero-shot segmentation stays at chance (docs/benchmarks.md, synthetic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pooled_similarity(group_embeddings: torch.Tensor, area: torch.Tensor, entities: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """group_embeddings (B, K, D) and entities (U, D) normalised, area (B, K) each group's
    share of the patches -> (B, U): tau * log sum_k area_k exp(cos_k / tau), a soft maximum
    over the groups that hold patches."""
    cos = torch.einsum("bkd,ud->bku", group_embeddings, entities)
    log_area = area.float().clamp_min(torch.finfo(torch.float32).tiny).log()[..., None]
    return tau * torch.logsumexp(cos.float() / tau + log_area, dim=1)


def grounding_loss(group_embeddings: torch.Tensor, area: torch.Tensor, entities: torch.Tensor,
                   targets: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary cross-entropy of the per-(image, entity) presence logits against `targets` (B, U)
    (1 where the caption names the entity)."""
    logits = scale * pooled_similarity(group_embeddings, area, entities, tau) + bias
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
