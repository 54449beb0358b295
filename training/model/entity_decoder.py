"""The cross-modal decoder of masked entity completion: the question (the caption with its
entity words masked) cross-attends to the image's group tokens, then self-attends; its first
token through a projector is the predicted answer embedding.

Two forms (`model.decoder`):
- "official" (`OfficialEntityDecoder`): OVSegmentor's multimodal grouping network. Per layer
  the normalised question tokens cross-attend to the normalised groups in a post-norm block,
  a pre-norm self-attention block runs over them (plus the previous layer's output), the
  cross-attended tokens are added back and a LayerNorm closes the layer; the first token goes
  through the bridge projector. The width is the narrower of the two encoders', the wider side
  passing through a Linear first (`align_proj_img` / `align_proj_text`, Identity otherwise).
  The official attention accepts the question's padding mask and never applies it;
  `model.decoder_padding_mask` honours it (ovseg) or not (official).
- "ovseg" (`EntityDecoder`): a Linear from the text width into the image width, then pre-norm
  layers (cross-attention, self-attention, MLP) and a final LayerNorm, at the image encoder's
  width and heads; what the CPU presets were measured with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ovseg.training.model.attention import CrossAttentionBlock, DecoderLayer, MultiHeadAttention
from ovseg.training.model.projector import Projector

DECODERS = ("official", "ovseg")


def _key_mask(question_mask: torch.Tensor, honour: bool) -> torch.Tensor | None:
    return question_mask if honour else None


class EntityDecoder(nn.Module):
    """ovseg's decoder (see the module docstring)."""

    def __init__(self, text_width: int, width: int, heads: int, depth: int, proj_hidden: int, embed_dim: int,
                 padding_mask: bool = True):
        super().__init__()
        self.padding_mask = padding_mask
        self.text_in = nn.Linear(text_width, width)
        self.layers = nn.ModuleList(DecoderLayer(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.projector = Projector(width, proj_hidden, embed_dim)

    def forward(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """question (B, L, Ct) text features, question_mask (B, L) 1 for real tokens, groups
        (B, K, C) -> (B, D) normalised embedding of the decoded first token."""
        return self.project(self.decode(question, question_mask, groups))

    def decode(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """The decoded first token (B, C), before the projector (each row its own sample's)."""
        tokens = self.text_in(question)  # (B, L, C)
        for layer in self.layers:
            tokens = layer(tokens, groups, _key_mask(question_mask, self.padding_mask))
        return self.norm(tokens[:, 0])

    def project(self, decoded: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, D) normalised; the projector's batch norm couples the rows."""
        return F.normalize(self.projector(decoded), dim=-1)


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention then MLP, with residuals (GroupViT's AttnBlock), with an
    optional key padding mask."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, key_mask)
        return x + self.mlp(self.norm2(x))


class OfficialDecoderLayer(nn.Module):
    """One block of OVSegmentor's multimodal grouping network."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)  # on the question tokens
        self.norm_x = nn.LayerNorm(dim)       # on the groups
        self.cross = CrossAttentionBlock(dim, heads, mlp_ratio, post_norm=True)
        self.self_attn = SelfAttentionBlock(dim, heads, mlp_ratio)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, previous: torch.Tensor | None, question: torch.Tensor, groups: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """previous (B, L, C) the last layer's output (None in the first), question (B, L, C)
        the aligned question tokens (every layer reads them), groups (B, K, C) -> (B, L, C)."""
        attended = self.cross(self.norm_tokens(question), self.norm_x(groups))  # (B, L, C)
        tokens = attended if previous is None else previous + attended
        return self.norm_out(self.self_attn(tokens, key_mask) + attended)


class OfficialEntityDecoder(nn.Module):
    """OVSegmentor's decoder (see the module docstring): 1 layer, 8 heads in the paper."""

    def __init__(self, text_width: int, image_width: int, heads: int, depth: int, proj_hidden: int, embed_dim: int,
                 padding_mask: bool = False):
        super().__init__()
        width = min(text_width, image_width)
        self.padding_mask = padding_mask
        # the wider side is brought down to the narrower one
        self.align_proj_img = nn.Linear(image_width, width) if image_width > text_width else nn.Identity()
        self.align_proj_text = nn.Linear(text_width, width) if text_width > image_width else nn.Identity()
        self.layers = nn.ModuleList(OfficialDecoderLayer(width, heads) for _ in range(depth))
        self.bridge_projector = Projector(width, proj_hidden, embed_dim)

    def forward(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """question (B, L, Ct) text features, question_mask (B, L) 1 for real tokens, groups
        (B, K, Cv) -> (B, D) normalised embedding of the decoded first token."""
        return self.project(self.decode(question, question_mask, groups))

    def decode(self, question: torch.Tensor, question_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """The decoded first token (B, C), before the bridge projector (each row its own sample's)."""
        question = self.align_proj_text(question)  # (B, L, C)
        groups = self.align_proj_img(groups)        # (B, K, C)
        key_mask = _key_mask(question_mask, self.padding_mask)
        tokens = None
        for layer in self.layers:
            tokens = layer(tokens, question, groups, key_mask)
        return tokens[:, 0]

    def project(self, decoded: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, D) normalised; the projector's batch norm couples the rows."""
        return F.normalize(self.bridge_projector(decoded), dim=-1)


def build_entity_decoder(cfg, text_width: int) -> nn.Module:
    """The decoder `cfg.decoder` names, with `cfg.decoder_heads` (None: the image encoder's)."""
    if cfg.decoder not in DECODERS:
        raise ValueError(f"unknown model.decoder {cfg.decoder!r}; choose from {', '.join(DECODERS)}")
    heads = cfg.decoder_heads or cfg.heads
    if cfg.decoder == "official":
        return OfficialEntityDecoder(text_width, cfg.width, heads, cfg.decoder_depth, cfg.proj_hidden,
                                     cfg.embed_dim, cfg.decoder_padding_mask)
    return EntityDecoder(text_width, cfg.width, heads, cfg.decoder_depth, cfg.proj_hidden, cfg.embed_dim,
                         cfg.decoder_padding_mask)
