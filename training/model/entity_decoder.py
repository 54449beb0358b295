"""The cross-modal decoder of masked entity completion: the question (the caption with its
entity words masked) cross-attends to the image's group tokens, then self-attends with its
padding masked; its first token through a projector is the predicted answer embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ovseg.training.model.attention import DecoderLayer
from ovseg.training.model.projector import Projector


class EntityDecoder(nn.Module):
    def __init__(self, text_width: int, width: int, heads: int, depth: int, proj_hidden: int, embed_dim: int):
        super().__init__()
        self.text_in = nn.Linear(text_width, width)
        self.layers = nn.ModuleList(DecoderLayer(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.projector = Projector(width, proj_hidden, embed_dim)

    def forward(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """question (B, L, Ct) text features, question_mask (B, L) 1 for real tokens, groups
        (B, K, C) -> (B, D) normalised embedding of the decoded first token."""
        tokens = self.text_in(question)  # (B, L, C)
        for layer in self.layers:
            tokens = layer(tokens, groups, question_mask)
        return F.normalize(self.projector(self.norm(tokens[:, 0])), dim=-1)
