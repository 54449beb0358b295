"""The model's settings: one dataclass, filled from a preset (training/presets/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ovseg.curation.contract import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ModelConfig:
    # image encoder: a ViT whose first blocks see patches + group tokens, then a grouping block
    image_size: int = 224
    patch_size: int = 16
    # "linear": ViT's patch embedding (the paper; what DINO weights fit); "conv": a stack of
    # stride-2 3x3 convolutions (timm's ConvStem), which learns shapes much faster from scratch
    patch_embed: str = "linear"
    # "cnn": a small CNN (timm ConvNormAct stages, each a strided conv then a stride-1 conv) whose
    # tokens already see a whole object; its first stage's map (twice the token grid when the
    # first stride is 2) also gives the cluster grouping its low-level (colour, edge) features
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    depth_before: int = 6  # blocks over patch and group tokens
    depth_after: int = 6   # blocks over the output groups
    num_group_tokens: int = 64
    num_groups: int = 8
    # further grouping stages (GroupViT has one: 3 blocks over the 64 groups and 8 new group
    # tokens, grouped into 8): per stage its blocks, group tokens and output groups; the
    # depth_after blocks then run over the last stage's groups
    extra_stage_depths: list[int] = field(default_factory=list)
    extra_stage_group_tokens: list[int] = field(default_factory=list)
    extra_stage_groups: list[int] = field(default_factory=list)
    drop_path: float = 0.0  # stochastic depth, rising linearly to this rate over all blocks
    patch_norm: bool = False  # LayerNorm after the patch embedding (GroupViT: yes; OVSegmentor: no)
    gumbel_tau: float = 1.0
    hard_assignment: bool = True  # Gumbel straight-through hard assignment in training
    # learned grouping: take each group's mean over the patches from its assignment logits
    # (ovseg's; GroupViT has none), so that no group takes every patch by a constant
    assign_center: bool = False
    # the Gumbel noise of the training hard assignment, times this (1: GroupViT's; 0: each patch
    # to its best group, straight-through): ovseg's, for assignment logits still far smaller than
    # the noise, where the sample is mostly noise and training groups differ from the test's
    assign_noise: float = 1.0
    # "learned": GroupViT's assignment (learned query-key softmax over groups, trained through
    # the assignment); "cluster": the group queries seed a few soft k-means steps over
    # gradient-free keys (low-level features, patch tokens, position), so no loss can collapse
    # the grouping; groups still pool the patch tokens with gradient (docs/model.md)
    grouping: str = "learned"
    cluster_iters: int = 3
    cluster_tau: float = 0.1             # temperature of the soft assignment (squared distances)
    cluster_low_weight: float = 1.0      # weight of the (unit-norm) low-level features in the keys
    cluster_token_weight: float = 2.0    # weight of the (unit-norm) patch tokens in the keys
    cluster_position_weight: float = 0.5  # weight of the (y, x) position in [-1, 1]
    # weight of the image's own colour (its normalised pixels averaged over each cell of the
    # assignment grid): flat-coloured regions then fall into one group with crisp borders
    cluster_pixel_weight: float = 0.0
    # input pixels per cell of the assignment grid (0: the low-level map's grid when there is
    # one, else the token grid); 1 draws the group maps at the input's own resolution
    cluster_stride: int = 0
    vision_init: str | None = None  # DINO checkpoint file (or timm model name, needs the hub)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    # text encoder: "bert" (OVSegmentor: BERT, the [CLS] token) or "clip" (GroupViT: a causal
    # transformer, the end-of-text token); from a hub name or directory, or random init
    text_arch: str = "bert"
    text_pretrained: str | None = None
    # the text encoder's transformers config (its to_dict()); without text_pretrained the encoder
    # is built from it (random init, the weights come from a checkpoint): what checkpoints record
    # so that loading one never downloads `text_pretrained` again
    text_config: dict[str, Any] | None = None
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_vocab_size: int | None = None  # random init: embedding rows (default: the tokenizer's vocabulary)
    text_dropout: float = 0.1  # random init: BERT's hidden and attention dropout
    max_text_length: int = 32
    # projectors into the shared space
    embed_dim: int = 256
    proj_hidden: int = 4096
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    # masked entity completion: a small cross-modal decoder (training/model/entity_decoder.py).
    # "official": OVSegmentor's (post-norm cross-attention, then self-attention, at the narrower
    # encoder's width, a bridge projector); "ovseg": pre-norm layers at the image width
    decoder: str = "ovseg"
    decoder_depth: int = 2
    decoder_heads: int | None = None  # None: the image encoder's `heads`
    # honour the question's padding in the decoder's self-attention (the official code accepts
    # the mask and never applies it)
    decoder_padding_mask: bool = True
    # cross-image mask consistency (training/losses/mask_consistency.py). "official": the
    # public code's loss (student: the image's assignment queries on the partner's momentum
    # keys, raw logits upsampled to the input; teacher: the partner's own; the groups least
    # related to the shared entity detached; L2 matching; sigmoid targets at a ratio of their
    # maximum; per-sample dice). "ovseg": the softmax masks below, with their settings
    mask_form: str = "ovseg"
    mask_group_ratio: float = 0.5        # official: this share of the groups (least related) gets no gradient
    mask_relative_threshold: float = 0.6  # official: target = sigmoid(logit) >= this x its mask's maximum
    momentum: float = 0.99
    # ovseg form only:
    mask_keep_groups: int = 4  # groups most related to the shared entity that get the loss
    mask_target_threshold: float = 0.5
    # which of the partner's groups the kept groups are matched to: "dice" (all of them, by mask
    # overlap; the paper) or "entity" (its groups most related to the shared entity)
    mask_matching: str = "dice"
    # the grid both masks are compared on: "assignment" (the one the groups are drawn on) or
    # "tokens" (the patch-token grid, which the cross-image masks can resolve)
    mask_grid: str = "assignment"
    # group grounding (ovseg's addition): every masked entity must be found in one group
    grounding_tau: float = 0.1         # temperature of the area-weighted soft maximum over groups
    grounding_scale_init: float = 10.0  # learnable scale and bias of the per-entity presence logit
    grounding_bias_init: float = -3.0
    # which losses are on, and their weights
    losses: list[str] = field(default_factory=lambda: ["contrastive", "entity"])
    loss_weights: dict[str, float] = field(default_factory=lambda: {"contrastive": 1.0, "entity": 1.0, "grounding": 1.0, "mask": 1.0})
