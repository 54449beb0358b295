"""Masked entity completion: the caption with its entity words masked (the question) reads
the image's groups through a small cross-modal decoder; its first token, projected, must match
(contrastively, over the batch) the embedding of a prompt naming the masked entities (the
answer, e.g. "a photo of a dog and a person")."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.training.losses.contrastive import contrastive_loss
from ovseg.training.model.attention import DecoderLayer
from ovseg.training.model.projector import Projector


class EntityCompletionLoss(nn.Module):
    def __init__(self, text_width: int, width: int, heads: int, depth: int, proj_hidden: int, embed_dim: int):
        super().__init__()
        self.text_in = nn.Linear(text_width, width)
        self.layers = nn.ModuleList(DecoderLayer(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.projector = Projector(width, proj_hidden, embed_dim)

    def decode(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """question (B, L, Ct) text features, question_mask (B, L), groups (B, K, C) -> (B, D)
        normalised embedding of the decoded first token."""
        tokens = self.text_in(question)  # (B, L, C)
        for layer in self.layers:
            tokens = layer(tokens, groups, question_mask)
        return F.normalize(self.projector(self.norm(tokens[:, 0])), dim=-1)

    def forward(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor,
                answer: torch.Tensor, has_entity: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        predicted = self.decode(question, question_mask, groups)
        return contrastive_loss(predicted, answer, logit_scale, valid=has_entity)
