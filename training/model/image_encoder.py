"""The image encoder: a timm ViT whose first blocks see patch tokens plus learnable group
tokens, a grouping block that turns them into K groups and assigns every patch to one, and
more blocks over the groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from timm.models.vision_transformer_hybrid import ConvStem

from ovseg.training.model.config import ModelConfig
from ovseg.training.model.grouping import ClusterSettings, GroupingBlock

log = logging.getLogger(__name__)


class GroupingInput(NamedTuple):
    """What the grouping block takes from the layers before it."""
    patches: torch.Tensor              # (B, N, C) patch tokens
    group_tokens: torch.Tensor         # (B, G, C)
    grid: tuple[int, int]              # the token grid (h, w)
    low: torch.Tensor | None           # (B, C0, H', W') the CNN embedding's first-stage map
    pixels: torch.Tensor | None        # (B, 3, H/s, W/s) the input averaged every cluster_stride pixels


@dataclass
class EncoderOutput:
    groups: torch.Tensor      # (B, K, C) output group tokens, normalised
    assignment: torch.Tensor  # (B, K, h, w) soft patch-to-group assignment (through every stage), sums to 1 over K
    anchors: torch.Tensor     # (B, K1, C') the first grouping block's group anchors (`Assignment.anchors`)
    inputs: GroupingInput     # what entered the grouping block (patch tokens, grid, low-level map, pixels)


class ConvPatchEmbed(nn.Module):
    """log2(patch size) stride-2 3x3 convolutions (timm's ConvStem, channels doubling up to the
    width) in place of the linear patch embedding; tokens come out (B, h, w, C) like PatchEmbed's."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        depth = patch_size.bit_length() - 1
        if patch_size != 2 ** depth or depth < 1:
            raise ValueError(f"a conv patch embedding needs a power-of-two patch size, not {patch_size}")
        self.stem = ConvStem(3, depth=depth, channels=width, stride=(2,) * depth, act_layer=nn.GELU)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem(images).permute(0, 2, 3, 1)


class CNNPatchEmbed(nn.Module):
    """A small CNN in place of the patch embedding: stages of a strided 3x3 conv then a
    stride-1 3x3 conv (timm ConvNormAct: batch norm, ReLU), stride 2 until the patch size is
    reached and 1 after, then a 1x1 conv to the width. Its tokens see about 35 px at patch 4,
    a whole object of the synthetic world, so a linear read-out of one token can already name
    it; the first stage's map is the low-level input of the cluster grouping."""

    def __init__(self, patch_size: int, width: int, channels: list[int]):
        super().__init__()
        from timm.layers import ConvNormAct

        halvings = patch_size.bit_length() - 1
        if patch_size != 2 ** halvings or halvings < 1:
            raise ValueError(f"a cnn patch embedding needs a power-of-two patch size, not {patch_size}")
        if len(channels) < halvings:
            raise ValueError(f"model.cnn_channels needs at least {halvings} stages for patch size {patch_size}")
        stages, c_in = [], 3
        for i, c in enumerate(channels):
            stride = 2 if i < halvings else 1
            stages.append(nn.Sequential(ConvNormAct(c_in, c, 3, stride=stride), ConvNormAct(c, c, 3)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(c_in, width, 1)
        self.low_dim = channels[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w, C) tokens and the first stage's (B, C0, H', W') map."""
        x = low = self.stages[0](images)
        for stage in self.stages[1:]:
            x = stage(x)
        return self.head(x).permute(0, 2, 3, 1), low


def assignment_stride(cfg: ModelConfig) -> int:
    """Input pixels per cell of the group maps: the clustering's `cluster_stride` when set, else
    the clustering over a CNN embedding draws them on its first stage's map (stride 2);
    everything else on the token grid."""
    if cfg.grouping == "cluster" and cfg.cluster_stride:
        return cfg.cluster_stride
    if cfg.grouping == "cluster" and cfg.patch_embed == "cnn":
        return 2
    return cfg.patch_size


def assignment_grid(cfg: ModelConfig) -> int:
    """Cells per side of the group maps at `cfg.image_size`."""
    return cfg.image_size // assignment_stride(cfg)


class GroupMixer(nn.Module):
    """The previous stage's group tokens (B, G, C) -> (B, G', C), mixed along the token axis
    (GroupViT's group projector: a LayerNorm, then an MLP over the tokens)."""

    def __init__(self, dim: int, tokens_in: int, tokens_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(tokens_in, dim // 2, tokens_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens).transpose(1, 2)).transpose(1, 2)


class GroupingStage(nn.Module):
    """A later grouping stage: blocks over the previous groups and this stage's group tokens
    (zero-initialised, plus the mixed group tokens of the stage before), then a grouping block."""

    def __init__(self, cfg: ModelConfig, depth: int, tokens_in: int, group_tokens: int, groups: int,
                 drop_path: list[float]):
        super().__init__()
        self.group_token = nn.Parameter(torch.zeros(1, group_tokens, cfg.width))
        self.projector = GroupMixer(cfg.width, tokens_in, group_tokens)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=nn.LayerNorm) for rate in drop_path)
        self.grouping = GroupingBlock(cfg.width, cfg.heads, group_tokens, groups, cfg.mlp_ratio,
                                      cfg.gumbel_tau, cfg.hard_assignment, center=cfg.assign_center,
                                      noise_scale=cfg.assign_noise)

    def forward(self, groups: torch.Tensor, previous_tokens: torch.Tensor):
        """groups (B, K, C) and the previous stage's group tokens (B, G, C) -> new groups
        (B, K', C), the soft assignment of the old groups to the new (B, K', K) and this
        stage's group tokens after its blocks (B, G', C)."""
        k = groups.shape[1]
        tokens = self.group_token + self.projector(previous_tokens)  # (B, G', C)
        x = torch.cat([groups, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        groups, tokens = x[:, :k], x[:, k:]
        new_groups, soft, _, _ = self.grouping(groups, tokens, (1, k))
        return new_groups, soft, tokens


def _drop_path_rates(cfg: ModelConfig) -> list[float]:
    """Stochastic depth per block, rising linearly from 0 to `drop_path` over all blocks."""
    depths = [cfg.depth_before, *cfg.extra_stage_depths, cfg.depth_after]
    n = sum(depths)
    return [cfg.drop_path * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class GroupingViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}")
        stages = (len(cfg.extra_stage_depths), len(cfg.extra_stage_group_tokens), len(cfg.extra_stage_groups))
        if len(set(stages)) != 1:
            raise ValueError("model.extra_stage_depths, extra_stage_group_tokens and extra_stage_groups "
                             f"must have one entry per extra grouping stage, not {stages[0]}, {stages[1]}, {stages[2]}")
        if stages[0] and cfg.grouping != "learned":
            raise ValueError("extra grouping stages need model.grouping=learned")
        self.patch_size = cfg.patch_size
        if cfg.patch_embed == "linear":
            self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, 3, cfg.width,
                                          norm_layer=nn.LayerNorm if cfg.patch_norm else None,
                                          strict_img_size=False, output_fmt="NHWC")
        elif cfg.patch_norm:
            raise ValueError("model.patch_norm needs model.patch_embed=linear")
        elif cfg.patch_embed == "conv":
            self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.width)
        elif cfg.patch_embed == "cnn":
            self.patch_embed = CNNPatchEmbed(cfg.patch_size, cfg.width, list(cfg.cnn_channels))
        else:
            raise ValueError(f"model.patch_embed must be linear, conv or cnn, not {cfg.patch_embed!r}")
        if cfg.grouping not in ("learned", "cluster"):
            raise ValueError(f"model.grouping must be learned or cluster, not {cfg.grouping!r}")
        cluster = None
        if cfg.grouping == "cluster":
            if cfg.cluster_stride < 0 or cfg.image_size % max(cfg.cluster_stride, 1):
                raise ValueError(f"model.cluster_stride must divide the image size {cfg.image_size}, "
                                 f"not {cfg.cluster_stride}")
            cluster = ClusterSettings(cfg.cluster_iters, cfg.cluster_tau, cfg.cluster_low_weight,
                                      cfg.cluster_token_weight, cfg.cluster_position_weight, cfg.cluster_pixel_weight)
        # the clustering's own grid (and colour keys): the input averaged over its cells
        self.pixel_stride = 0
        if cluster is not None and (cfg.cluster_stride or cfg.cluster_pixel_weight):
            self.pixel_stride = assignment_stride(cfg)
        self.grid = (cfg.image_size // cfg.patch_size,) * 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], cfg.width))
        self.group_token = nn.Parameter(torch.zeros(1, cfg.num_group_tokens, cfg.width))
        rates = iter(_drop_path_rates(cfg))
        # blocks normalise with nn.LayerNorm (eps 1e-5) as GroupViT's and OVSegmentor's do (timm's is 1e-6)
        self.blocks_before = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True, drop_path=next(rates), norm_layer=nn.LayerNorm)
            for _ in range(cfg.depth_before))
        self.grouping = GroupingBlock(cfg.width, cfg.heads, cfg.num_group_tokens, cfg.num_groups,
                                      cfg.mlp_ratio, cfg.gumbel_tau, cfg.hard_assignment, cluster=cluster,
                                      low_dim=getattr(self.patch_embed, "low_dim", 0), center=cfg.assign_center,
                                      noise_scale=cfg.assign_noise)
        self.stages = nn.ModuleList()
        tokens_in, groups_in = cfg.num_group_tokens, cfg.num_groups
        for depth, group_tokens, groups in zip(cfg.extra_stage_depths, cfg.extra_stage_group_tokens,
                                               cfg.extra_stage_groups):
            self.stages.append(GroupingStage(cfg, depth, tokens_in, group_tokens, groups,
                                             [next(rates) for _ in range(depth)]))
            tokens_in, groups_in = group_tokens, groups
        self.blocks_after = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True, drop_path=next(rates), norm_layer=nn.LayerNorm)
            for _ in range(cfg.depth_after))
        self.norm = nn.LayerNorm(cfg.width)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.group_token, std=0.02)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == self.grid:
            return self.pos_embed
        # bicubic without antialiasing, as GroupViT's and OVSegmentor's inference resamples it
        return resample_abs_pos_embed(self.pos_embed, [h, w], old_size=list(self.grid), num_prefix_tokens=0,
                                      antialias=False)

    def before_grouping(self, images: torch.Tensor) -> GroupingInput:
        """Patch tokens (B, N, C) and group tokens (B, G, C) after the first blocks, the token
        grid, the patch embedding's low-level map (None unless it makes one) and the image
        averaged every `cluster_stride` pixels (None unless the clustering asks for it)."""
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(images)  # (B, h, w, C), and for the CNN also its low-level map
        x, low = x if isinstance(x, tuple) else (x, None)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c) + self._pos_embed(h, w)
        n = x.shape[1]
        tokens = torch.cat([x, self.group_token.expand(b, -1, -1)], dim=1)  # (B, N + G, C)
        for block in self.blocks_before:
            tokens = block(tokens)
        pixels = None
        if self.pixel_stride:
            pixels = F.avg_pool2d(images, self.pixel_stride) if self.pixel_stride > 1 else images  # (B, 3, H/s, W/s)
        return GroupingInput(tokens[:, :n], tokens[:, n:], (h, w), low, pixels)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        x = self.before_grouping(images)
        groups, soft, anchors, (h, w) = self.grouping(x.patches, x.group_tokens, x.grid, x.low, x.pixels)  # (B, K, C), (B, K, N')
        tokens = x.group_tokens
        for stage in self.stages:
            groups, stage_soft, tokens = stage(groups, tokens)  # (B, K', C), (B, K', K)
            soft = stage_soft @ soft  # (B, K', N'): a patch's share of each new group, through the old ones
        for block in self.blocks_after:
            groups = block(groups)
        groups = self.norm(groups)
        b, k, _ = soft.shape
        return EncoderOutput(groups, soft.view(b, k, h, w), anchors, x)


class VisionInitError(RuntimeError):
    """model.vision_init cannot be read: the CLI prints it as a one-line error."""


class VisionInitMissing(VisionInitError, FileNotFoundError):
    """model.vision_init names a checkpoint file that does not exist."""


def block_names(encoder: GroupingViT) -> list[str]:
    """The encoder's transformer blocks in the order the input passes them (state-dict prefixes)."""
    names = [f"blocks_before.{i}" for i in range(len(encoder.blocks_before))]
    for s, stage in enumerate(encoder.stages):
        names += [f"stages.{s}.blocks.{i}" for i in range(len(stage.blocks))]
    return names + [f"blocks_after.{i}" for i in range(len(encoder.blocks_after))]


def load_dino(encoder: GroupingViT, source: str) -> tuple[list[str], list[str]]:
    """Load a DINO ViT (a local checkpoint file, or a timm model name when the hub is reachable)
    into the encoder's blocks in order: DINO block i goes to the i-th block the input passes
    (`block_names`: the blocks before grouping, those of later stages, those after). Returns
    (missing, unexpected)."""
    if Path(source).exists():
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(source)
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
        for key in ("teacher", "student", "model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    elif source.endswith((".pth", ".pt", ".bin", ".safetensors")) or "/" in source.removeprefix("hf-hub:"):
        raise VisionInitMissing(f"vision init checkpoint {source} does not exist")
    else:
        import timm

        try:
            state = timm.create_model(source, pretrained=True).state_dict()
        except Exception as error:  # no hub access, unknown name: say what to do instead
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise VisionInitError(f"could not fetch the timm model {source!r} ({type(error).__name__}: {first}); "
                                  "pass a local DINO checkpoint file as model.vision_init") from error
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    targets = block_names(encoder)
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            i = int(index)
            if i >= len(targets):
                unexpected.append(key)
                continue
            mapped[f"{targets[i]}.{rest}"] = value
        elif key == "pos_embed":
            n = value.shape[1]
            side = int(round((n - 1) ** 0.5))
            if side * side == n - 1:  # DINO keeps a class-token position first: drop it
                value, n = value[:, 1:], n - 1
            side = int(round(n ** 0.5))
            if (side, side) != encoder.grid:
                value = resample_abs_pos_embed(value, list(encoder.grid), old_size=[side, side], num_prefix_tokens=0,
                                               antialias=False)
            mapped["pos_embed"] = value
        elif key.startswith(("patch_embed.", "norm.")):
            mapped[key] = value
        else:
            unexpected.append(key)  # cls_token, heads: nothing to load them into
    own = encoder.state_dict()
    for key in list(mapped):
        if key not in own:
            unexpected.append(key)
            del mapped[key]
        elif own[key].shape != mapped[key].shape:
            raise ValueError(f"{source}: {key} has shape {tuple(mapped[key].shape)}, the model {tuple(own[key].shape)}")
    result = encoder.load_state_dict(mapped, strict=False)
    missing = list(result.missing_keys)
    log.info("DINO init from %s: %d tensors loaded, %d missing (%s...), %d unexpected (%s)",
             source, len(mapped), len(missing), ", ".join(missing[:4]), len(unexpected), ", ".join(unexpected[:6]))
    return missing, unexpected
