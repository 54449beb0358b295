"""The grouping block: learnable group tokens become K output groups, and every patch is
assigned to one of them by a softmax over the groups (GroupViT's grouping block, as
OVSegmentor uses it)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ovseg.training.model.attention import CrossAttentionBlock


def gumbel_softmax_over_groups(logits: torch.Tensor, tau: float, hard: bool) -> torch.Tensor:
    """Softmax over dim 1 (the groups) with Gumbel noise; straight-through one-hot if `hard`."""
    # noise and softmax in float32: a bf16 exponential sample can round to 0 (log -> inf)
    gumbels = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()
    soft = ((logits.float() + gumbels) / tau).softmax(dim=1)
    if not hard:
        return soft.to(logits.dtype)
    index = soft.argmax(dim=1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(1, index, 1.0)
    return (one_hot - soft.detach() + soft).to(logits.dtype)  # forward: one-hot; backward: the soft gradient


class AssignAttention(nn.Module):
    """Patches (keys/values) to group queries: attention normalised over the queries."""

    def __init__(self, dim: int, tau: float = 1.0, hard: bool = True):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim ** -0.5
        self.tau = tau
        self.hard = hard

    def logits(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(queries) @ self.k_proj(x).transpose(1, 2) * self.scale  # (B, K, N)

    def forward(self, queries: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.logits(queries, x)  # (B, K, N)
        soft = raw.softmax(dim=1)  # each patch's distribution over the groups
        if self.training:
            attn = gumbel_softmax_over_groups(raw, self.tau, self.hard)
        else:
            attn = soft
        # each group takes the mean of the patches assigned to it
        attn_norm = attn / (attn.sum(dim=-1, keepdim=True) + 1.0)
        out = self.proj(attn_norm @ self.v_proj(x))  # (B, K, C)
        return out, soft


class GroupingBlock(nn.Module):
    """G group tokens -> K output groups; patches are merged into the groups they belong to."""

    def __init__(self, dim: int, heads: int, num_group_tokens: int, num_groups: int,
                 mlp_ratio: float = 4.0, tau: float = 1.0, hard: bool = True):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        # mixes along the token axis: G group tokens -> K group queries
        self.mlp_inter = Mlp(num_group_tokens, int(0.5 * dim), num_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign = CrossAttentionBlock(dim, heads, mlp_ratio)
        self.assign = AssignAttention(dim, tau, hard)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim), dim)

    def queries(self, group_tokens: torch.Tensor) -> torch.Tensor:
        """(B, G, C) group tokens -> (B, K, C) group queries."""
        tokens = self.norm_tokens(group_tokens)
        queries = self.mlp_inter(tokens.transpose(1, 2)).transpose(1, 2)  # (B, K, C)
        queries = self.norm_post_tokens(queries)
        return self.pre_assign(queries, tokens)

    def masks(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Soft assignment (B, K, N) of patch tokens `x` to group `queries` (from any image)."""
        return self.assign.logits(queries, self.norm_x(x)).softmax(dim=1)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor):
        """x (B, N, C) patches, group_tokens (B, G, C) -> groups (B, K, C), soft assignment
        (B, K, N) and the group queries (B, K, C)."""
        queries = self.queries(group_tokens)
        merged, soft = self.assign(queries, self.norm_x(x))
        groups = queries + merged
        groups = groups + self.mlp_channels(self.norm_new_x(groups))
        return groups, soft, queries
