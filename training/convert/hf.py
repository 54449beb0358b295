"""A transformers `GroupViTModel` folder (`save_pretrained`) as an ovseg checkpoint: the
architecture from its config.json, the weights from its safetensors (or .bin) files, read
without running code. transformers' GroupViT is a port of the official GroupViT; its names:
`vision_model.embeddings` (patch projection, LayerNorm, positions), `vision_model.encoder.stages.i`
(`group_token`, `group_projector` (LayerNorm, token-mixing MLP), `layers.j` (CLIP-style
layer_norm1, self_attn q/k/v/out_proj, layer_norm2, mlp), `downsample` (the grouping block, its
cross-attention `pre_assign_attn` with separate q/k/v/out_proj)), `vision_model.layernorm`,
`text_model.*` (CLIP's text transformer), `visual_projection` / `text_projection` (Linear,
BatchNorm1d, ReLU, Linear) and `logit_scale`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ovseg.training.convert.common import ConvertError, load_tokenizer, write_checkpoint
from ovseg.training.convert.official import Tracked, _grouping


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(load_file(str(file)))
        return weights
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        weights = {}
        for file in bins:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
        return weights
    raise ConvertError(f"{folder} has no model weights (*.safetensors or pytorch_model*.bin)")


def _encoder_layer(weights: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP-style encoder layer -> a timm Block (fused qkv)."""
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}norm1.{kind}"] = weights[f"{src}layer_norm1.{kind}"]
        out[f"{dst}attn.qkv.{kind}"] = torch.cat([weights[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{dst}attn.proj.{kind}"] = weights[f"{src}self_attn.out_proj.{kind}"]
        out[f"{dst}norm2.{kind}"] = weights[f"{src}layer_norm2.{kind}"]
        out[f"{dst}mlp.fc1.{kind}"] = weights[f"{src}mlp.fc1.{kind}"]
        out[f"{dst}mlp.fc2.{kind}"] = weights[f"{src}mlp.fc2.{kind}"]
    return out


def _projector(weights: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    out = {f"{dst}fc1.{k}": weights[f"{src}0.{k}"] for k in ("weight", "bias")}
    out.update({f"{dst}fc2.{k}": weights[f"{src}3.{k}"] for k in ("weight", "bias")})
    out.update({f"{dst}norm.{k}": weights[f"{src}1.{k}"] for k in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked") if f"{src}1.{k}" in weights})
    return out


def convert_hf_groupvit(src: str | Path, out: str | Path, tokenizer: str | None = None) -> dict[str, Any]:
    """A transformers GroupViTModel folder -> an ovseg checkpoint at `out`, with the folder's own
    tokenizer unless `tokenizer` names another. Returns the converters' summary."""
    folder = Path(src)
    if not (folder / "config.json").is_file():
        raise ConvertError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ConvertError(f"{folder / 'config.json'} is not readable JSON ({error})") from error
    if config.get("model_type") != "groupvit":
        raise ConvertError(f"{folder} holds a {config.get('model_type')!r} model, not groupvit")
    from transformers import GroupViTConfig

    cfg = GroupViTConfig.from_dict(config)
    vision, text = cfg.vision_config, cfg.text_config
    depths, tokens, groups = list(vision.depths), list(vision.num_group_tokens), list(vision.num_output_groups)
    if len(depths) < 2 or tokens[-1] != 0 or any(t == 0 for t in tokens[:-1]):
        raise ConvertError(f"{folder}: group tokens {tokens} per stage: every stage but the last needs some")
    tok = load_tokenizer(tokenizer or str(folder))
    weights = Tracked(_read_weights(folder))

    v, dst = "vision_model.", "image_encoder."
    mapped = {dst + "patch_embed.proj.weight": weights[v + "embeddings.patch_embeddings.projection.weight"],
              dst + "patch_embed.proj.bias": weights[v + "embeddings.patch_embeddings.projection.bias"],
              dst + "patch_embed.norm.weight": weights[v + "embeddings.layernorm.weight"],
              dst + "patch_embed.norm.bias": weights[v + "embeddings.layernorm.bias"],
              dst + "pos_embed": weights[v + "embeddings.position_embeddings"],
              dst + "group_token": weights[v + "encoder.stages.0.group_token"],
              dst + "norm.weight": weights[v + "layernorm.weight"], dst + "norm.bias": weights[v + "layernorm.bias"]}
    last = len(depths) - 1
    for s, depth in enumerate(depths):
        stage = f"{v}encoder.stages.{s}."
        target = (dst + "blocks_before." if s == 0 else dst + "blocks_after." if s == last
                  else f"{dst}stages.{s - 1}.blocks.")
        for j in range(depth):
            mapped.update(_encoder_layer(weights, f"{stage}layers.{j}.", f"{target}{j}."))
        if s == last:
            continue
        grouping = dst + "grouping." if s == 0 else f"{dst}stages.{s - 1}.grouping."
        mapped.update(_grouping(weights, stage + "downsample.", grouping, out_proj="out_proj"))
        if s > 0:
            mine = f"{dst}stages.{s - 1}."
            mapped[mine + "group_token"] = weights[stage + "group_token"]
            for kind in ("weight", "bias"):
                mapped[f"{mine}projector.norm.{kind}"] = weights[f"{stage}group_projector.0.{kind}"]
                for fc in ("fc1", "fc2"):
                    mapped[f"{mine}projector.mlp.{fc}.{kind}"] = weights[f"{stage}group_projector.1.{fc}.{kind}"]
    mapped.update({"text_encoder.clip." + k: w for k, w in weights.take("text_model.").items()
                   if not k.endswith("position_ids")})
    mapped.update(_projector(weights, "visual_projection.", "image_projector."))
    mapped.update(_projector(weights, "text_projection.", "text_projector."))
    mapped["logit_scale"] = weights["logit_scale"].reshape(())

    side = vision.image_size // vision.patch_size
    text_values = {k: text.to_dict()[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")}
    values = dict(width=vision.hidden_size, heads=vision.num_attention_heads, patch_size=vision.patch_size,
                  image_size=side * vision.patch_size, patch_embed="linear", patch_norm=True, grouping="learned",
                  mlp_ratio=vision.intermediate_size / vision.hidden_size, depth_before=depths[0],
                  depth_after=depths[-1], num_group_tokens=tokens[0], num_groups=groups[0],
                  extra_stage_depths=depths[1:-1], extra_stage_group_tokens=tokens[1:-1],
                  extra_stage_groups=groups[1:-1], text_arch="clip", text_config=text_values,
                  max_text_length=text.max_position_embeddings, losses=["contrastive"],
                  proj_hidden=cfg.projection_intermediate_dim, embed_dim=cfg.projection_dim)
    image = _image_normalisation(folder)
    if image:
        values.update(image)
    source = {"format": "hf-groupvit", "source": str(folder), "tokenizer": tokenizer or str(folder),
              "architecture_from": "config", "left_out": weights.unused()}
    return write_checkpoint(out, values, mapped, tok, source)


def _image_normalisation(folder: Path) -> dict[str, Any]:
    """image_mean / image_std from the folder's preprocessor_config.json, when it has one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    values = json.loads(path.read_text())
    if "image_mean" in values and "image_std" in values:
        return {"image_mean": list(values["image_mean"]), "image_std": list(values["image_std"])}
    return {}
