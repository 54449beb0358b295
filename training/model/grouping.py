"""The grouping block: learnable group tokens become K output groups, and every patch is
assigned to one of them by a softmax over the groups (GroupViT's grouping block, as
OVSegmentor uses it)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


def grid_positions(h: int, w: int, device=None) -> torch.Tensor:
    """(h * w, 2) cell centres (y, x) in [-1, 1], row-major."""
    ys = torch.linspace(-1.0, 1.0, h, device=device) if h > 1 else torch.zeros(1, device=device)
    xs = torch.linspace(-1.0, 1.0, w, device=device) if w > 1 else torch.zeros(1, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy, xx], dim=-1).view(h * w, 2)


def _unit(x: torch.Tensor, length: float) -> torch.Tensor:
    """x (B, C, N) with each column scaled to `length` (F.normalize(x, dim=1) * length, eps
    1e-12): one broadcast product, whose backward is several times cheaper than the
    division by an expanded norm that F.normalize's is, on the (B, 128, 256) token map."""
    return x * (length * torch.rsqrt(x.pow(2).sum(1, keepdim=True).clamp_min(1e-24)))


@functools.lru_cache(maxsize=8)
def _upsampling(grid: tuple[int, int], size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H W, h w): bilinear upsampling (align_corners=False) from `grid` (h, w) to `size`
    (H, W) as a matrix U, so that for a map m on `grid`, the upsampled map is U @ m.flatten(),
    and weights a on `size` pull back to `grid` as a @ U."""
    h, w = grid
    basis = torch.eye(h * w, device=device, dtype=torch.float32).view(h * w, 1, h, w)
    up = F.interpolate(basis, size=size, mode="bilinear", align_corners=False)
    return up.view(h * w, -1).T.contiguous().to(dtype)


@dataclass
class ClusterSettings:
    """The `model.cluster_*` settings (their defaults live in ModelConfig)."""
    iters: int
    tau: float
    low_weight: float
    token_weight: float
    position_weight: float


class ClusterAssign(nn.Module):
    """Soft k-means over keys that carry no gradient, seeded by the group queries.

    A key is [low-level features, patch token, position], each part unit-normalised and
    weighted, on the low-level map's grid (the token grid when there is none). The queries
    pick the first soft assignment by cosine similarity; each step moves every centre to the
    mean of its keys and reassigns by squared distance (a softmax over the groups). No loss
    reaches the assignment, so none can fold every patch into one group, the collapse
    GroupViT's learned assignment showed on the synthetic world (docs/quality.md); the groups
    still pool the patch tokens with gradient, and the centres keep a gradient path through
    the token part of the keys for cross-image mask consistency."""

    def __init__(self, dim: int, low_dim: int, settings: ClusterSettings):
        super().__init__()
        self.settings = settings
        self.seed = nn.Linear(dim, low_dim + dim + 2)  # into the key space: [low-level, token, (y, x)]
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def keys(self, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None):
        """Keys (B, N', Dk), contiguous, with gradient in the token part only, and their grid."""
        st = self.settings
        b, n, c = x.shape
        h, w = grid
        tokens = x.transpose(1, 2).reshape(b, c, h, w)
        parts = []
        if low is not None:
            size = tuple(low.shape[-2:])
            if size != (h, w):
                tokens = F.interpolate(tokens, size=size, mode="bilinear", align_corners=False)
            parts.append(_unit(low.detach().flatten(2).float(), st.low_weight))
            h, w = size
        parts.append(_unit(tokens.flatten(2).float(), st.token_weight))
        parts.append(st.position_weight * grid_positions(h, w, x.device).T[None].expand(b, -1, -1))
        # (B, N', d) views, joined along the last axis: one contiguous copy
        return torch.cat([part.transpose(1, 2) for part in parts], dim=-1), (h, w)

    def soft_assign(self, centres: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, K, Dk) centres, (B, N, Dk) keys -> (B, K, N), a softmax over the groups of minus
        the squared distance / tau. A key's own squared norm is the same for every group, so it
        cancels in the softmax and is never computed: |c|^2 - 2 c.k is enough."""
        logits = 2 * centres @ keys.transpose(1, 2) - centres.pow(2).sum(-1)[:, :, None]
        return (logits / self.settings.tau).softmax(dim=1)

    def forward(self, queries: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None):
        """queries (B, K, C), x (B, N, C) normalised patch tokens -> merged groups (B, K, C),
        soft assignment (B, K, N'), centres (B, K, Dk) and the assignment's grid."""
        keys, out_grid = self.keys(x, grid, low)
        free = keys.detach()
        with torch.no_grad():
            # cosine similarity of the seeds and the keys: the keys' norms divide the product
            seed = F.normalize(self.seed(queries).float(), dim=-1)
            cosine = (seed @ free.transpose(1, 2)) / free.norm(dim=-1).clamp_min(1e-12)[:, None, :]
            soft = (cosine / self.settings.tau).softmax(dim=1)
            for _ in range(self.settings.iters):
                centres = (soft / (soft.sum(-1, keepdim=True) + 1e-6)) @ free
                soft = self.soft_assign(centres, free)
        # the centres of the final assignment, differentiable through the token part of the keys
        centres = (soft / (soft.sum(-1, keepdim=True) + 1e-6)) @ keys
        soft = soft.to(x.dtype)
        attn = soft / (soft.sum(dim=-1, keepdim=True) + 1.0)  # (B, K, N') on the key grid
        if out_grid != tuple(grid):
            # the values stay on the token grid: pooling upsampled values equals pooling the
            # values with the assignment pulled back through the (linear) upsampling
            attn = attn @ _upsampling(tuple(grid), out_grid, attn.device, attn.dtype)
        merged = self.proj(attn @ self.v_proj(x))  # (B, K, C)
        return merged, soft, centres, out_grid

    def masks(self, centres: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None) -> torch.Tensor:
        """Soft assignment (B, K, N') of another image's keys to `centres`, with gradient."""
        keys, _ = self.keys(x, grid, low)
        return self.soft_assign(centres, keys)


class GroupingBlock(nn.Module):
    """G group tokens -> K output groups; patches are merged into the groups they belong to."""

    def __init__(self, dim: int, heads: int, num_group_tokens: int, num_groups: int,
                 mlp_ratio: float = 4.0, tau: float = 1.0, hard: bool = True,
                 cluster: ClusterSettings | None = None, low_dim: int = 0):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        # mixes along the token axis: G group tokens -> K group queries
        self.mlp_inter = Mlp(num_group_tokens, int(0.5 * dim), num_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign = CrossAttentionBlock(dim, heads, mlp_ratio)
        # GroupViT's learned assignment, or soft k-means over gradient-free keys
        self.assign = AssignAttention(dim, tau, hard) if cluster is None else ClusterAssign(dim, low_dim, cluster)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim), dim)

    def queries(self, group_tokens: torch.Tensor) -> torch.Tensor:
        """(B, G, C) group tokens -> (B, K, C) group queries."""
        tokens = self.norm_tokens(group_tokens)
        queries = self.mlp_inter(tokens.transpose(1, 2)).transpose(1, 2)  # (B, K, C)
        queries = self.norm_post_tokens(queries)
        return self.pre_assign(queries, tokens)

    @property
    def clustered(self) -> bool:
        return isinstance(self.assign, ClusterAssign)

    def masks(self, queries: torch.Tensor, x: torch.Tensor, grid: tuple[int, int],
              low: torch.Tensor | None = None) -> torch.Tensor:
        """Soft assignment (B, K, N') of another image's patch tokens `x` (on `grid`, with its
        low-level map) to this image's group `queries` (the centres, when clustered)."""
        if self.clustered:
            return self.assign.masks(queries, self.norm_x(x), grid, low)
        return self.assign.logits(queries, self.norm_x(x)).softmax(dim=1)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor, grid: tuple[int, int],
                low: torch.Tensor | None = None):
        """x (B, N, C) patches on `grid`, group_tokens (B, G, C) -> groups (B, K, C), soft
        assignment (B, K, N'), the group queries (B, K, C; the key-space centres when
        clustered) and the assignment's grid (the low-level map's when clustered over one)."""
        queries = self.queries(group_tokens)
        if self.clustered:
            # the queries only seed the clustering: a group is what it pools
            merged, soft, centres, grid = self.assign(queries, self.norm_x(x), grid, low)
            return merged + self.mlp_channels(self.norm_new_x(merged)), soft, centres, grid
        merged, soft = self.assign(queries, self.norm_x(x))
        groups = queries + merged
        groups = groups + self.mlp_channels(self.norm_new_x(groups))
        return groups, soft, queries, grid
