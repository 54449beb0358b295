"""Masked entity completion: the decoded question (see `EntityDecoder`) must match,
contrastively over the global batch, the text embedding of a prompt naming the masked entities
(the answer, e.g. "a photo of a dog and a person"). Only samples with a masked entity count."""

from __future__ import annotations

import torch

from ovseg.training.losses.contrastive import contrastive_loss


def entity_completion_loss(predicted: torch.Tensor, answer: torch.Tensor, has_entity: torch.Tensor,
                           logit_scale: torch.Tensor) -> torch.Tensor:
    """predicted (B, D) decoded questions, answer (B, D) answer-prompt embeddings, both
    normalised; has_entity (B,) bool. Samples without an entity are neither rows nor negatives."""
    return contrastive_loss(predicted, answer, logit_scale, valid=has_entity)
