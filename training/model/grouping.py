"""The grouping block: learnable group tokens become K output groups, and every patch is
assigned to one of them by a softmax over the groups (GroupViT's grouping block, as
OVSegmentor uses it).

The block asks an assigner to assign the patches to its group queries. Two assigners share one
interface (`Assigner`): GroupViT's learned assignment (`AssignAttention`) and ovseg's soft
k-means (`ClusterAssign`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ovseg.training.model import noise
from ovseg.training.model.attention import CrossAttentionBlock


class Assignment(NamedTuple):
    merged: torch.Tensor  # (B, K, C) each group's pooled patches, projected
    soft: torch.Tensor  # (B, K, N') the soft patch-to-group assignment, on `grid`
    # (B, K, C') each group's anchor: what `Assigner.masks` compares another image's patches
    # with (the learned assignment's group queries; the clustering's key-space centres)
    anchors: torch.Tensor
    grid: tuple[int, int]  # the assignment's grid (finer than the tokens' when clustered over a finer map)


class Assigner(Protocol):
    """What the grouping block needs of an assignment of patches to groups."""

    # groups = queries + merged (GroupViT), or the merged patches alone (clustering: the queries
    # only seed it)
    residual: bool
    # the queries cross-attend to the normalised patch tokens (GroupViT's post-norm block), or
    # to the group tokens themselves in a pre-norm block (the clustering recipe, as measured)
    queries_see_patches: bool

    def __call__(self, queries: torch.Tensor, x: torch.Tensor, grid: tuple[int, int],
                 low: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> Assignment:
        """Group queries (B, K, C) and normalised patch tokens (B, N, C) on `grid`, with the
        image's low-level map and pooled pixels where the stem gives them."""

    def masks(self, anchors: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None = None,
              pixels: torch.Tensor | None = None, fine: bool = True) -> torch.Tensor:
        """Soft assignment (B, K, N') of another image's normalised patch tokens `x` to this
        image's groups (`anchors`), with gradient: on the grid `__call__` draws its assignment
        on, or on `grid` unless `fine`."""


def gumbel_softmax_over_groups(logits: torch.Tensor, tau: float, hard: bool, salt: int = 0,
                                scale: float = 1.0) -> torch.Tensor:
    """Softmax over dim 1 (the groups) with Gumbel noise times `scale` (1: GroupViT's; 0: none,
    the best group); straight-through one-hot if `hard`. `salt`: the calling module's, for
    per-sample noise (training/model/noise.py)."""
    # noise and softmax in float32: a bf16 exponential sample can round to 0 (log -> inf)
    soft = logits.float()
    if scale:
        soft = soft + scale * noise.gumbel(logits, salt)
    soft = (soft / tau).softmax(dim=1)
    if not hard:
        return soft.to(logits.dtype)
    index = soft.argmax(dim=1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(1, index, 1.0)
    return (one_hot - soft.detach() + soft).to(logits.dtype)  # forward: one-hot; backward: the soft gradient


def hard_one_hot_over_groups(soft: torch.Tensor) -> torch.Tensor:
    """Straight-through one-hot of the best group of each patch (dim 1), without noise."""
    index = soft.argmax(dim=1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(1, index, 1.0)
    return one_hot - soft.detach() + soft


class AssignAttention(nn.Module):
    """Patches (keys/values) to group queries: attention normalised over the queries (one head).

    With `hard` (GroupViT's and OVSegmentor's setting) a patch goes to one group: a Gumbel
    straight-through sample in training (its noise times `noise_scale`), the best group at eval;
    otherwise the softmax over the groups, in training and at eval. Each group then takes the
    mean of its patches.

    With `center` (ovseg's, off in GroupViT) each group's logits have their mean over the
    patches taken away: a group's score then says only which patches fit it better than the
    image's others, and no group can take every patch by one constant over the image."""

    residual = True
    queries_see_patches = True

    def __init__(self, dim: int, tau: float = 1.0, hard: bool = True, center: bool = False,
                 noise_scale: float = 1.0):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = dim ** -0.5
        self.tau = tau
        self.hard = hard
        self.center = center
        self.noise_scale = noise_scale

    def project_q(self, queries: torch.Tensor) -> torch.Tensor:
        return self.q_proj(queries)  # (B, K, C)

    def project_k(self, x: torch.Tensor) -> torch.Tensor:
        return self.k_proj(x)  # (B, N, C)

    def logits(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Group queries (B, K, C) against normalised patch tokens (B, N, C) -> (B, K, N)."""
        return self.logits_of(self.project_q(queries), self.project_k(x))

    def logits_of(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Projected queries (B, K, C) against projected keys (B, N, C) -> (B, K, N), centred
        over the patches with `center`: what the assignment and the official mask loss read."""
        logits = q @ k.transpose(1, 2) * self.scale
        return logits - logits.mean(dim=-1, keepdim=True) if self.center else logits

    def forward(self, queries: torch.Tensor, x: torch.Tensor, grid: tuple[int, int] | None = None,
                low: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> Assignment:
        raw = self.logits(queries, x)  # (B, K, N)
        soft = raw.softmax(dim=1)  # each patch's distribution over the groups
        if not self.hard:
            attn = soft
        elif self.training:
            attn = gumbel_softmax_over_groups(raw, self.tau, hard=True, salt=getattr(self, "noise_salt", 0),
                                              scale=self.noise_scale)
        else:
            attn = hard_one_hot_over_groups(soft)
        # each group takes the mean of the patches assigned to it
        attn_norm = attn / (attn.sum(dim=-1, keepdim=True) + 1.0)
        out = self.proj(attn_norm @ self.v_proj(x))  # (B, K, C)
        return Assignment(out, soft, queries, grid)

    def masks(self, anchors: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None = None,
              pixels: torch.Tensor | None = None, fine: bool = True) -> torch.Tensor:
        return self.logits(anchors, x).softmax(dim=1)  # (B, K, N): the token grid is the only one


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
    pixel_weight: float = 0.0


class ClusterAssign(nn.Module):
    """Soft k-means over keys that carry no gradient, seeded by the group queries.

    A key is [low-level features, patch token, colour, position], the first two unit-normalised,
    each weighted, on the clustering grid: the low-level map's (the token grid when there is
    none). The colour, only with a pixel weight, is the image's normalised pixels averaged over
    each cell. The queries pick the first soft assignment by cosine similarity; each step moves
    every centre to the mean of its keys and reassigns by squared distance (a softmax over the
    groups). When the image's pooled pixels come on a finer grid than the clustering's, the
    final assignment is drawn on that grid: every fine cell goes to the centres by the same
    distance, each part read on its own grid (a dot product with a centre commutes with
    bilinear resampling, so it is taken on the coarse grid and resampled). No loss reaches the
    assignment, so none can fold every patch into one group, the collapse a learned assignment
    trained from scratch can fall into (docs/recipes.md); the groups still pool the
    patch tokens with gradient, and the centres keep a gradient path through the token part of
    the keys for cross-image mask consistency, whose masks compare token parts only."""

    residual = False
    queries_see_patches = False

    def __init__(self, dim: int, low_dim: int, settings: ClusterSettings):
        super().__init__()
        self.settings = settings
        colour = 3 if settings.pixel_weight else 0
        self.seed = nn.Linear(dim, low_dim + dim + colour + 2)  # into the key space: [low-level, token, colour, (y, x)]
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def keys(self, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None,
             pixels: torch.Tensor | None = None):
        """Keys (B, N', Dk) on the clustering grid, contiguous, with gradient in the token part
        only, and that grid. `pixels` (B, 3, H', W'): the input averaged over cells of any grid."""
        st = self.settings
        b, n, c = x.shape
        h, w = grid
        size = tuple(low.shape[-2:]) if low is not None else (h, w)
        tokens = x.transpose(1, 2).reshape(b, c, h, w)
        if size != (h, w):
            tokens = F.interpolate(tokens, size=size, mode="bilinear", align_corners=False)
        parts = []
        if low is not None:
            parts.append(_unit(low.detach().flatten(2).float(), st.low_weight))
        parts.append(_unit(tokens.flatten(2).float(), st.token_weight))
        if st.pixel_weight:
            parts.append(st.pixel_weight * _pooled(pixels, size).flatten(2).float())
        parts.append(st.position_weight * grid_positions(*size, x.device).T[None].expand(b, -1, -1))
        # (B, N', d) views, joined along the last axis: one contiguous copy
        return torch.cat([part.transpose(1, 2) for part in parts], dim=-1), size

    def soft_assign(self, centres: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, K, Dk) centres, (B, N, Dk) keys -> (B, K, N), a softmax over the groups of minus
        the squared distance / tau. A key's own squared norm is the same for every group, so it
        cancels in the softmax and is never computed: |c|^2 - 2 c.k is enough."""
        logits = 2 * centres @ keys.transpose(1, 2) - centres.pow(2).sum(-1)[:, :, None]
        return (logits / self.settings.tau).softmax(dim=1)

    def fine_assign(self, centres: torch.Tensor, x: torch.Tensor, grid: tuple[int, int],
                    low: torch.Tensor | None, pixels: torch.Tensor) -> torch.Tensor:
        """`soft_assign` of the cells of the pixels' grid (B, K, H' W'): the low-level and token
        parts' products with the centres are taken on their own grids and resampled
        bilinearly; colour and position are read on the fine grid. Differentiable through the
        token part, like the keys."""
        st = self.settings
        b, k, _ = centres.shape
        size = tuple(pixels.shape[-2:])
        first = 0

        def product(features: torch.Tensor, weight: float, cells: tuple[int, int]) -> torch.Tensor:
            nonlocal first
            d = features.shape[1]
            dot = centres[..., first:first + d] @ _unit(features.flatten(2).float(), weight)  # (B, K, cells)
            first += d
            dot = dot.view(b, k, *cells)
            if cells != size:
                dot = F.interpolate(dot, size=size, mode="bilinear", align_corners=False)
            return dot.flatten(2)  # (B, K, H' W')

        dots = 0
        if low is not None:
            dots = dots + product(low.detach(), st.low_weight, tuple(low.shape[-2:]))
        dots = dots + product(x.transpose(1, 2), st.token_weight, tuple(grid))
        if st.pixel_weight:
            colour = centres[..., first:first + 3]
            first += 3
            dots = dots + colour @ (st.pixel_weight * pixels.detach().flatten(2).float())
        position = st.position_weight * grid_positions(*size, x.device).T  # (2, H' W')
        dots = dots + centres[..., first:first + 2] @ position
        logits = 2 * dots - centres.pow(2).sum(-1)[:, :, None]
        return (logits / st.tau).softmax(dim=1)

    def forward(self, queries: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None) -> Assignment:
        """queries (B, K, C), x (B, N, C) normalised patch tokens -> merged groups (B, K, C),
        soft assignment (B, K, N'), centres (B, K, Dk: the anchors) and the assignment's grid."""
        keys, out_grid = self.keys(x, grid, low, pixels)
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
        if self._finer(pixels, out_grid):
            with torch.no_grad():
                soft = self.fine_assign(centres.detach(), x, grid, low, pixels)
            out_grid = tuple(pixels.shape[-2:])
        soft = soft.to(x.dtype)
        attn = soft / (soft.sum(dim=-1, keepdim=True) + 1.0)  # (B, K, N') on the assignment grid
        if out_grid != tuple(grid):
            # the values stay on the token grid: pooling upsampled values equals pooling the
            # values with the assignment pulled back through the (linear) upsampling
            attn = attn @ _upsampling(tuple(grid), out_grid, attn.device, attn.dtype)
        merged = self.proj(attn @ self.v_proj(x))  # (B, K, C)
        return Assignment(merged, soft, centres, out_grid)

    @staticmethod
    def _finer(pixels: torch.Tensor | None, grid: tuple[int, int]) -> bool:
        return pixels is not None and tuple(pixels.shape[-2:]) != tuple(grid)

    def masks(self, centres: torch.Tensor, x: torch.Tensor, grid: tuple[int, int], low: torch.Tensor | None = None,
              pixels: torch.Tensor | None = None, fine: bool = True) -> torch.Tensor:
        """Soft assignment (B, K, N') of another image's cells to `centres`, with gradient, on
        the grid `forward` draws its assignment on (on the token grid unless `fine`), by the
        token part of the keys alone: across images a group is what it shows, not where it is
        or what colour (the partner's shared object lies elsewhere and may be another colour)."""
        st = self.settings
        b, n, c = x.shape
        k = centres.shape[1]
        first = low.shape[1] if low is not None else 0
        token_centres = centres[..., first:first + c]  # (B, K, C)
        dots = (token_centres @ _unit(x.transpose(1, 2).float(), st.token_weight)).view(b, k, *grid)
        size = tuple(low.shape[-2:]) if low is not None else tuple(grid)
        if self._finer(pixels, size):
            size = tuple(pixels.shape[-2:])
        if fine and size != tuple(grid):
            dots = F.interpolate(dots, size=size, mode="bilinear", align_corners=False)
        logits = 2 * dots.flatten(2) - token_centres.pow(2).sum(-1)[:, :, None]
        return (logits / st.tau).softmax(dim=1)


def _pooled(pixels: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """The pooled pixels (B, 3, H', W') averaged down to `size` (as they are when they fit)."""
    if pixels is None:
        raise ValueError("a pixel weight needs the image's pooled pixels")
    return pixels if tuple(pixels.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(pixels, size)


class GroupingBlock(nn.Module):
    """G group tokens -> K output groups; patches are merged into the groups they belong to.

    GroupViT's block, as OVSegmentor uses it: the normalised group tokens are mixed along the
    token axis into K queries, which cross-attend to the normalised patch tokens (a post-norm
    block); the assigner then assigns every patch to one of them. With `cluster` the assigner
    is a soft k-means that the queries only seed (ovseg's CPU recipe); its queries attend to the
    group tokens, in a pre-norm block, as that recipe was measured (docs/model.md, deviations)."""

    def __init__(self, dim: int, heads: int, num_group_tokens: int, num_groups: int,
                 mlp_ratio: float = 4.0, tau: float = 1.0, hard: bool = True,
                 cluster: ClusterSettings | None = None, low_dim: int = 0, center: bool = False,
                 noise_scale: float = 1.0):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        # mixes along the token axis: G group tokens -> K group queries
        self.mlp_inter = Mlp(num_group_tokens, int(0.5 * dim), num_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        # GroupViT's learned assignment, or soft k-means over gradient-free keys; built after
        # pre_assign, so that a seed draws the same initial weights (and the optimiser's state
        # keeps its parameter order)
        kind = AssignAttention if cluster is None else ClusterAssign
        self.pre_assign = CrossAttentionBlock(dim, heads, mlp_ratio, post_norm=kind.queries_see_patches)
        self.assign: Assigner = AssignAttention(dim, tau, hard, center, noise_scale) if cluster is None else ClusterAssign(dim, low_dim, cluster)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(mlp_ratio * dim), dim)

    def queries(self, group_tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, G, C) group tokens and (B, N, C) normalised patch tokens -> (B, K, C) group
        queries: the mixed group tokens after cross-attending to the patches (or to the group
        tokens themselves, as the assigner asks)."""
        tokens = self.norm_tokens(group_tokens)
        queries = self.mlp_inter(tokens.transpose(1, 2)).transpose(1, 2)  # (B, K, C)
        queries = self.norm_post_tokens(queries)
        return self.pre_assign(queries, x if self.assign.queries_see_patches else tokens)

    def masks(self, anchors: torch.Tensor, x: torch.Tensor, grid: tuple[int, int],
              low: torch.Tensor | None = None, pixels: torch.Tensor | None = None, fine: bool = True) -> torch.Tensor:
        """Soft assignment (B, K, N') of another image's patch tokens `x` (on `grid`, with its
        low-level map and pooled pixels) to this image's groups (their `anchors`), on the grid
        the groups are drawn on, or on `grid` unless `fine`."""
        return self.assign.masks(anchors, self.norm_x(x), grid, low, pixels, fine)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor, grid: tuple[int, int],
                low: torch.Tensor | None = None, pixels: torch.Tensor | None = None):
        """x (B, N, C) patches on `grid`, group_tokens (B, G, C) -> groups (B, K, C), soft
        assignment (B, K, N'), the groups' anchors (B, K, C'; see `Assignment`) and the
        assignment's grid."""
        x = self.norm_x(x)
        queries = self.queries(group_tokens, x)
        out = self.assign(queries, x, grid, low, pixels)
        groups = queries + out.merged if self.assign.residual else out.merged
        groups = groups + self.mlp_channels(self.norm_new_x(groups))
        return groups, out.soft, out.anchors, out.grid
