"""Attention blocks the paper adds to the timm ViT: cross-attention with an optional key
padding mask, on `F.scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp


class MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, C), context (B, Lk, C), key_mask (B, Lk) true where a key is real."""
        b, lq, c = query.shape
        h = self.heads
        q = self.q(query).view(b, lq, h, c // h).transpose(1, 2)  # (B, h, Lq, c/h)
        k, v = self.kv(context).view(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (B, h, Lk, c/h) each
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, lq, c))


class CrossAttentionBlock(nn.Module):
    """Cross-attention then MLP, with residuals. Pre-norm (LayerNorm on the queries and the
    context before attending) or, with `post_norm`, GroupViT's form: attend with the inputs as
    they come, add the MLP of the normalised sum, and normalise the output."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        if not post_norm:
            self.norm_q = nn.LayerNorm(dim)
            self.norm_kv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), dim)
        if post_norm:
            self.norm_post = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            query = query + self.attn(query, context, key_mask)
            query = query + self.mlp(self.norm_mlp(query))
            return self.norm_post(query)
        query = query + self.attn(self.norm_q(query), self.norm_kv(context), key_mask)
        return query + self.mlp(self.norm_mlp(query))


class DecoderLayer(nn.Module):
    """Question tokens cross-attend to the groups, then self-attend (padding masked), then MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_groups = nn.LayerNorm(dim)
        self.cross = MultiHeadAttention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), dim)

    def forward(self, tokens: torch.Tensor, groups: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.cross(self.norm_cross(tokens), self.norm_groups(groups))
        normed = self.norm_self(tokens)
        tokens = tokens + self.self_attn(normed, normed, token_mask)
        return tokens + self.mlp(self.norm_mlp(tokens))
