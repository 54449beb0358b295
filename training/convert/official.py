"""The official OVSegmentor and GroupViT checkpoints (github Jazzcharles/OVSegmentor,
NVlabs/GroupViT) as ovseg checkpoints.

Both image encoders are GroupViT's `GroupViT` module: `layers.i` hold a stage's blocks over
patch and group tokens (`blocks.j`: timm-style `norm1`, fused `attn.qkv`, `attn.proj`, `norm2`,
`mlp.fc1/fc2`), its `group_token`, a `group_projector` from the previous stage's group tokens
(from the second stage on) and a `downsample` grouping block (`norm_tokens`, the token-mixing
`mlp_inter`, `norm_post_tokens`, `norm_x`, a post-norm cross-attention `pre_assign_attn` with
separate q/k/v projections, the assignment `assign`, `norm_new_x`, `mlp_channels`); the last
layer has blocks only, then `norm`. The projectors are `ProjectMLP`s of 1-wide convolutions.
OVSegmentor's text encoder is BERT as transformers writes it (`text_encoder.transformer.*`); its
entity-completion head maps onto ovseg's official decoder (`map_entity_head`).
GroupViT's text encoder is a CLIP-style causal transformer (`text_encoder.*`: nn.MultiheadAttention
blocks).

The architecture comes from the checkpoint's config when the file has one, else from the tensor
shapes; attention heads show in no shape: the config's, else the official 8 (OVSegmentor's
image encoder) or width / 64 (GroupViT's, and both text encoders)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ovseg.training.convert.common import ConvertError, load_tokenizer, read_source, write_checkpoint

OVSEGMENTOR_IMAGE_HEADS = 8
# what the official files hold that no ovseg module computes: the momentum encoder (rebuilt from
# the image encoder when stage 2 starts), the mask loss's unused temperature, BERT's pooler (the
# [CLS] feature goes to the projector before it), position/type id buffers, and the entity
# head's assignment layer (built by the official code, never called)
SKIPPED = re.compile(r"^(img_encoder_momentum\.|logit_scale_mask$|multi_label_logit_scale$|"
                     r"multimodal_groupingblock\.blocks\.\d+\.assign\.|"
                     r"text_encoder\.transformer\.pooler\.|"
                     r"text_encoder\.transformer\.embeddings\.(position_ids|token_type_ids)$)")


class Tracked(dict):
    """A state dict that remembers which keys were read (the rest is reported as left out)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def take(self, prefix: str, without: str | None = None) -> dict[str, torch.Tensor]:
        """{rest of the key: tensor} for the keys under `prefix` (but not under `without`)."""
        keys = [k for k in self if k.startswith(prefix) and not (without and k.startswith(without))]
        return {k[len(prefix):]: self[k] for k in keys}

    def unused(self) -> list[str]:
        return sorted(k for k in self if k not in self.used and not SKIPPED.match(k))


def _layer_indices(weights: dict[str, torch.Tensor], prefix: str, part: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(part))
    return sorted({int(m.group(1)) for k in weights if (m := pattern.match(k))})


def image_architecture(weights: dict[str, torch.Tensor], config: dict[str, Any], default_heads: int | None,
                       prefix: str = "img_encoder.") -> dict[str, Any]:
    """ovseg `model.*` values of the official image encoder under `prefix`."""
    if prefix + "patch_embed.proj.weight" not in weights:
        raise ConvertError(f"no {prefix}patch_embed.proj.weight: not an official GroupViT-style image encoder")
    width, _, patch, _ = weights[prefix + "patch_embed.proj.weight"].shape
    layers = _layer_indices(weights, prefix + "layers.", "")
    depths = [len(_layer_indices(weights, f"{prefix}layers.{i}.blocks.", "")) for i in layers]
    if len(layers) < 2 or any(f"{prefix}layers.{i}.downsample.assign.q_proj.weight" not in weights
                              for i in layers[:-1]):
        raise ConvertError(f"{prefix}layers: every stage but the last needs a grouping block "
                           f"(found {len(layers)} stages)")
    group_tokens = [weights[f"{prefix}layers.{i}.group_token"].shape[1] for i in layers[:-1]]
    groups = [weights[f"{prefix}layers.{i}.downsample.mlp_inter.fc2.weight"].shape[0] for i in layers[:-1]]
    if any(f"{prefix}layers.{i}.downsample.reduction.1.weight" in weights for i in layers[:-1]):
        raise ConvertError("stages of different widths (embed_factors other than 1) are not supported")
    n = weights[prefix + "pos_embed"].shape[-2]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConvertError(f"{prefix}pos_embed has {n} positions, not a square grid")
    encoder = config.get("model", {}).get("img_encoder", {}) if isinstance(config.get("model"), dict) else {}
    heads = encoder.get("num_heads") or [default_heads or max(1, width // 64)]
    values = dict(width=int(width), heads=int(heads[0]), patch_size=int(patch), image_size=int(side * patch),
                  patch_embed="linear", grouping="learned", depth_before=depths[0], depth_after=depths[-1],
                  num_group_tokens=int(group_tokens[0]), num_groups=int(groups[0]),
                  mlp_ratio=weights[f"{prefix}layers.0.blocks.0.mlp.fc1.weight"].shape[0] / width)
    values.update(patch_norm=prefix + "patch_embed.norm.weight" in weights, extra_stage_depths=depths[1:-1],
                  extra_stage_group_tokens=[int(g) for g in group_tokens[1:]],
                  extra_stage_groups=[int(g) for g in groups[1:]])
    return values


def _cross_attention(weights: dict[str, torch.Tensor], src: str, dst: str, out_proj: str = "proj") -> dict[str, torch.Tensor]:
    """The official post-norm CrossAttnBlock (separate q/k/v; transformers' GroupViT names its
    output projection `out_proj`) onto ovseg's CrossAttentionBlock (q, fused kv)."""
    a = src + "attn."
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}attn.q.{kind}"] = weights[f"{a}q_proj.{kind}"]
        out[f"{dst}attn.kv.{kind}"] = torch.cat([weights[f"{a}k_proj.{kind}"], weights[f"{a}v_proj.{kind}"]])
        out[f"{dst}attn.proj.{kind}"] = weights[f"{a}{out_proj}.{kind}"]
        out[f"{dst}norm_mlp.{kind}"] = weights[f"{src}norm2.{kind}"]
        out[f"{dst}norm_post.{kind}"] = weights[f"{src}norm_post.{kind}"]
        for fc in ("fc1", "fc2"):
            out[f"{dst}mlp.{fc}.{kind}"] = weights[f"{src}mlp.{fc}.{kind}"]
    return out


def _grouping(weights: Tracked, src: str, dst: str, out_proj: str = "proj") -> dict[str, torch.Tensor]:
    """A GroupViT grouping block (official or transformers'; `out_proj` as in `_cross_attention`)."""
    # norm_tokens, mlp_inter, norm_post_tokens, norm_x, assign, norm_new_x, mlp_channels: same names
    out = {dst + k: v for k, v in weights.take(src, without=src + "pre_assign_attn.").items()}
    return {**out, **_cross_attention(weights, src + "pre_assign_attn.", dst + "pre_assign.", out_proj)}


def _blocks(weights: Tracked, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {dst + k: v for k, v in weights.take(src).items()}  # timm Block names


def map_image_encoder(weights: dict[str, torch.Tensor], prefix: str = "img_encoder.") -> dict[str, torch.Tensor]:
    """Official image encoder tensors -> ovseg `image_encoder.*` (first stage `blocks_before` and
    `grouping`, middle stages `stages.i`, the last stage's blocks `blocks_after`)."""
    dst = "image_encoder."
    layers = _layer_indices(weights, prefix + "layers.", "")
    out = {dst + "patch_embed.proj.weight": weights[prefix + "patch_embed.proj.weight"],
           dst + "patch_embed.proj.bias": weights[prefix + "patch_embed.proj.bias"],
           dst + "pos_embed": weights[prefix + "pos_embed"].reshape(1, *weights[prefix + "pos_embed"].shape[-2:]),
           dst + "norm.weight": weights[prefix + "norm.weight"], dst + "norm.bias": weights[prefix + "norm.bias"],
           dst + "group_token": weights[f"{prefix}layers.{layers[0]}.group_token"]}
    for kind in ("weight", "bias"):
        if f"{prefix}patch_embed.norm.{kind}" in weights:
            out[f"{dst}patch_embed.norm.{kind}"] = weights[f"{prefix}patch_embed.norm.{kind}"]
    out.update(_blocks(weights, f"{prefix}layers.{layers[0]}.blocks.", dst + "blocks_before."))
    out.update(_grouping(weights, f"{prefix}layers.{layers[0]}.downsample.", dst + "grouping."))
    for j, i in enumerate(layers[1:-1]):
        stage, layer = f"{dst}stages.{j}.", f"{prefix}layers.{i}."
        out[stage + "group_token"] = weights[layer + "group_token"]
        # group_projector: a LayerNorm (0), then a token-mixing Mlp (1: fc1, fc2)
        for k, v in weights.take(layer + "group_projector.").items():
            index, rest = k.split(".", 1)
            out[stage + ("projector.norm." if index == "0" else "projector.mlp.") + rest] = v
        out.update(_blocks(weights, layer + "blocks.", stage + "blocks."))
        out.update(_grouping(weights, layer + "downsample.", stage + "grouping."))
    out.update(_blocks(weights, f"{prefix}layers.{layers[-1]}.blocks.", dst + "blocks_after."))
    return out


def map_projector(weights: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """ProjectMLP (Conv1d k=1, BatchNorm1d, ReLU, Conv1d k=1) -> ovseg Projector (fc1, norm, fc2)."""
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}fc1.{kind}"] = weights[f"{src}linear_hidden.0.{kind}"].flatten(1) if kind == "weight" \
            else weights[f"{src}linear_hidden.0.{kind}"]
        out[f"{dst}fc2.{kind}"] = weights[f"{src}linear_out.{kind}"].flatten(1) if kind == "weight" \
            else weights[f"{src}linear_out.{kind}"]
    for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if f"{src}linear_hidden.1.{part}" in weights:
            out[f"{dst}norm.{part}"] = weights[f"{src}linear_hidden.1.{part}"]
    return out


def map_entity_head(weights: Tracked) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """OVSegmentor's entity-completion head -> ovseg's official decoder (`model.decoder=official`):
    per block of `multimodal_groupingblock` its norms, the post-norm cross-attention
    `pre_assign_attn` (separate q/k/v), the pre-norm self-attention `post_attn` (fused qkv) and
    `norm_new_x`; `align_proj_*` when the widths differ; `bridge_projector`. The block's
    `assign` is built by the official code but never used: it stays out. ({}, {}) without one."""
    src = "multimodal_groupingblock.blocks."
    blocks = _layer_indices(weights, src, "")
    if not blocks or "bridge_projector.linear_out.weight" not in weights:
        return {}, {}
    out: dict[str, torch.Tensor] = {}
    for i in blocks:
        a, b = f"{src}{i}.", f"entity_decoder.layers.{i}."
        s_attn = a + "post_attn."
        for kind in ("weight", "bias"):
            for mine, theirs in (("norm_tokens", "norm_tokens"), ("norm_x", "norm_x"), ("norm_out", "norm_new_x"),
                                 ("self_attn.norm1", "post_attn.norm1"), ("self_attn.norm2", "post_attn.norm2"),
                                 ("self_attn.attn.proj", "post_attn.attn.proj"),
                                 ("self_attn.mlp.fc1", "post_attn.mlp.fc1"),
                                 ("self_attn.mlp.fc2", "post_attn.mlp.fc2")):
                out[f"{b}{mine}.{kind}"] = weights[f"{a}{theirs}.{kind}"]
            qkv = weights[f"{s_attn}attn.qkv.{kind}"]
            width = qkv.shape[0] // 3
            out[f"{b}self_attn.attn.q.{kind}"], out[f"{b}self_attn.attn.kv.{kind}"] = qkv[:width], qkv[width:]
        out.update(_cross_attention(weights, a + "pre_assign_attn.", b + "cross."))
    for side in ("img", "text"):
        for kind in ("weight", "bias"):
            if f"align_proj_{side}.{kind}" in weights:
                out[f"entity_decoder.align_proj_{side}.{kind}"] = weights[f"align_proj_{side}.{kind}"]
    out.update(map_projector(weights, "bridge_projector.", "entity_decoder.bridge_projector."))
    values = dict(decoder="official", decoder_depth=len(blocks), decoder_heads=OVSEGMENTOR_IMAGE_HEADS,
                  decoder_padding_mask=False)
    return values, out


def _projector_values(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "img_projector.linear_hidden.0.weight" not in weights:
        raise ConvertError("no img_projector.linear_hidden.0.weight: only 2-layer ProjectMLP projectors are supported")
    hidden = weights["img_projector.linear_hidden.0.weight"].shape[0]
    return dict(proj_hidden=int(hidden), embed_dim=int(weights["img_projector.linear_out.weight"].shape[0]))


def convert_ovsegmentor(src: str | Path, out: str | Path, tokenizer: str = "bert-base-uncased") -> dict[str, Any]:
    """An official OVSegmentor checkpoint (stage 1 or 2; or its `model` state dict alone) -> an
    ovseg checkpoint at `out` carrying `tokenizer` (a hub name or a local folder). Returns a
    summary: what was converted, what the ovseg model keeps at its initial values, what of the
    source was left out."""
    from ovseg.training.model.text_encoder import text_config_from_weights

    raw, config = read_source(src)
    weights = Tracked(raw)
    if not any(k.startswith("img_encoder.") for k in weights) or not any(k.startswith("text_encoder.transformer.")
                                                                         for k in weights):
        raise ConvertError(f"{src}: no img_encoder.* and text_encoder.transformer.* weights: "
                           "not an OVSegmentor checkpoint")
    tok = load_tokenizer(tokenizer)
    values = image_architecture(weights, config, OVSEGMENTOR_IMAGE_HEADS)
    values.update(_projector_values(weights), text_arch="bert", max_text_length=77, losses=["contrastive"],
                  text_config=text_config_from_weights(weights, "text_encoder.transformer.", "bert"))
    decoder, entity = map_entity_head(weights)
    if decoder:  # a stage-1 or stage-2 file: `--init` continues its entity head
        values.update(decoder, losses=["contrastive", "entity"])
    mapped = map_image_encoder(weights)
    mapped.update(entity)
    mapped.update(map_projector(weights, "img_projector.", "image_projector."))
    mapped.update(map_projector(weights, "text_projector.", "text_projector."))
    text = weights.take("text_encoder.transformer.")
    mapped.update({"text_encoder.bert." + k: v for k, v in text.items()
                   if not SKIPPED.match("text_encoder.transformer." + k)})
    mapped["logit_scale"] = weights["logit_scale"].reshape(())
    source = {"format": "ovsegmentor", "source": str(src), "tokenizer": tokenizer,
              "architecture_from": "config" if config.get("model") else "shapes",
              "left_out": weights.unused()}
    return write_checkpoint(out, values, mapped, tok, source)


def _clip_text(weights: Tracked, tokenizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """GroupViT's text transformer (`text_encoder.*`: token and position embeddings, resblocks of
    nn.MultiheadAttention with a fused in-projection, ln_final) -> a transformers CLIPTextModel
    config and `text_encoder.clip.*` weights (its text transformer). Its sentence is the end-of-text token
    (the official code takes the largest id, CLIP's end-of-text): the tokenizer's eos id."""
    src, dst = "text_encoder.", "text_encoder.clip."
    vocab, width = weights[src + "token_embedding.weight"].shape
    positions = weights[src + "positional_embedding"]
    out = {dst + "embeddings.token_embedding.weight": weights[src + "token_embedding.weight"],
           dst + "embeddings.position_embedding.weight": positions,
           dst + "final_layer_norm.weight": weights[src + "ln_final.weight"],
           dst + "final_layer_norm.bias": weights[src + "ln_final.bias"]}
    depth = len(_layer_indices(weights, src + "transformer.resblocks.", ""))
    for i in range(depth):
        a, b = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = weights[f"{a}attn.in_proj_{kind}"].chunk(3)
            out.update({f"{b}self_attn.q_proj.{kind}": q, f"{b}self_attn.k_proj.{kind}": k,
                        f"{b}self_attn.v_proj.{kind}": v,
                        f"{b}self_attn.out_proj.{kind}": weights[f"{a}attn.out_proj.{kind}"],
                        f"{b}layer_norm1.{kind}": weights[f"{a}ln_1.{kind}"],
                        f"{b}layer_norm2.{kind}": weights[f"{a}ln_2.{kind}"],
                        f"{b}mlp.fc1.{kind}": weights[f"{a}mlp.c_fc.{kind}"],
                        f"{b}mlp.fc2.{kind}": weights[f"{a}mlp.c_proj.{kind}"]})
    config = dict(vocab_size=int(vocab), hidden_size=int(width), num_hidden_layers=depth,
                  num_attention_heads=max(1, int(width) // 64),
                  intermediate_size=int(weights[f"{src}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                  max_position_embeddings=int(positions.shape[0]), hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  **{f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")})
    return config, out


def convert_groupvit(src: str | Path, out: str | Path, tokenizer: str = "nvidia/groupvit-gcc-yfcc") -> dict[str, Any]:
    """An official GroupViT checkpoint (or its `model` state dict alone) -> an ovseg checkpoint
    at `out` with GroupViT's CLIP-style text encoder and `tokenizer` (CLIP's BPE: a hub name or
    a local folder). Returns the same summary as `convert_ovsegmentor`."""
    raw, config = read_source(src)
    weights = Tracked(raw)
    if "img_encoder.patch_embed.proj.weight" not in weights or "text_encoder.token_embedding.weight" not in weights:
        raise ConvertError(f"{src}: no img_encoder.* and text_encoder.token_embedding: not a GroupViT checkpoint")
    tok = load_tokenizer(tokenizer)
    values = image_architecture(weights, config, None)
    text_config, text = _clip_text(weights, tok)
    values.update(_projector_values(weights), text_arch="clip", text_config=text_config,
                  max_text_length=text_config["max_position_embeddings"], losses=["contrastive"])
    mapped = map_image_encoder(weights)
    mapped.update(map_projector(weights, "img_projector.", "image_projector."))
    mapped.update(map_projector(weights, "text_projector.", "text_projector."))
    mapped.update(text)
    mapped["logit_scale"] = weights["logit_scale"].reshape(())
    source = {"format": "groupvit", "source": str(src), "tokenizer": tokenizer,
              "architecture_from": "config" if config.get("model") else "shapes", "left_out": weights.unused()}
    return write_checkpoint(out, values, mapped, tok, source)
