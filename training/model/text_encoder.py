"""The text encoder, built with transformers: a BERT-style encoder (OVSegmentor; its first token
[CLS] is the sentence) or a CLIP-style causal transformer (GroupViT; its end-of-text token is the
sentence). From a hub name or a local directory (`text_pretrained`), else from a saved
transformers config (`text_config`: what a checkpoint records, so that loading one never
downloads), else from the `text_*` fields with random init for small presets."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ovseg.training.model.config import ModelConfig

TEXT_ARCHS = ("bert", "clip")


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        if cfg.text_arch not in TEXT_ARCHS:
            raise ValueError(f"model.text_arch must be one of {', '.join(TEXT_ARCHS)}, not {cfg.text_arch!r}")
        self.arch = cfg.text_arch
        if cfg.text_pretrained:
            model = _from_pretrained(self.arch, cfg.text_pretrained)
        elif cfg.text_config:
            model = _from_config(self.arch, cfg.text_config)
        else:
            model = _from_config(self.arch, _random_init_config(cfg, tokenizer))
        # keep the attribute names: they are the checkpoints' key prefixes (text_encoder.bert.*, .clip.*)
        if self.arch == "bert":
            self.bert = model
        else:  # the text transformer itself (transformers 4 wraps it in CLIPTextModel.text_model)
            self.clip = getattr(model, "text_model", model)
        self.width = model.config.hidden_size

    @property
    def transformer(self) -> nn.Module:
        return self.bert if self.arch == "bert" else self.clip

    def config_dict(self) -> dict[str, Any]:
        """The transformers config as plain values: enough to rebuild this encoder offline."""
        return _plain(self.transformer.config.to_dict())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token features (B, L, C); `pool` picks the sentence's."""
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, C) token features -> (B, C): BERT's first token ([CLS]); CLIP's end-of-text
        token, found as transformers' CLIPTextTransformer finds it (the first end-of-text id, or
        the largest id for old configs whose eos_token_id is 2)."""
        if self.arch == "bert":
            return features[:, 0]
        eos = self.clip.config.eos_token_id
        ids = input_ids.to(torch.int)
        position = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
        return features[torch.arange(features.shape[0], device=features.device), position]


def _from_pretrained(arch: str, source: str) -> nn.Module:
    from transformers import AutoModel, CLIPTextModel

    if arch == "bert":
        return AutoModel.from_pretrained(source, add_pooling_layer=False)
    return CLIPTextModel.from_pretrained(source)


def _from_config(arch: str, values: dict[str, Any]) -> nn.Module:
    """A randomly initialised encoder of the given transformers config (weights come after)."""
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    if arch == "bert":
        return BertModel(BertConfig.from_dict(dict(values)), add_pooling_layer=False)
    return CLIPTextModel(CLIPTextConfig.from_dict(dict(values)))


def _random_init_config(cfg: ModelConfig, tokenizer) -> dict[str, Any]:
    if tokenizer is None and cfg.text_vocab_size is None:
        raise ValueError("a randomly initialised text encoder needs a tokenizer or model.text_vocab_size")
    if tokenizer is not None and cfg.text_vocab_size and cfg.text_vocab_size < len(tokenizer):
        raise ValueError(f"model.text_vocab_size {cfg.text_vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({len(tokenizer)})")
    shared = dict(vocab_size=cfg.text_vocab_size or len(tokenizer), hidden_size=cfg.text_width,
                  num_hidden_layers=cfg.text_depth, num_attention_heads=cfg.text_heads,
                  intermediate_size=cfg.text_intermediate, max_position_embeddings=max(64, cfg.max_text_length))
    if cfg.text_arch == "bert":
        return dict(shared, pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
                    hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout)
    ids = {}
    if tokenizer is not None:  # the pooled token is the tokenizer's end-of-text
        ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")
               if getattr(tokenizer, f"{name}_token_id", None) is not None}
    return dict(shared, attention_dropout=cfg.text_dropout, **ids)


def _plain(value):
    """JSON-like values only (weights-only loading and YAML take them)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def text_config_from_weights(weights: dict[str, torch.Tensor], prefix: str, arch: str = "bert") -> dict[str, Any]:
    """The transformers config of a BERT (`arch` "bert") or CLIP text model ("clip") whose
    weights are under `prefix` (e.g. "text_encoder.bert."), read from the tensor shapes. Heads
    show in no shape: hidden size / 64, as in BERT-base and CLIP. CLIP's end-of-text id is not
    in the weights either: the caller sets `eos_token_id` from its tokenizer."""
    def shape(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in weights:
            raise KeyError(f"no {key} among the weights: not a {arch} text encoder under {prefix!r}")
        return tuple(weights[key].shape)

    if arch == "bert":
        layer = "encoder.layer."
        vocab, hidden = shape("embeddings.word_embeddings.weight")
        values = dict(max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
                      type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
                      intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0])
    elif arch == "clip":
        layer = "encoder.layers."
        vocab, hidden = shape("embeddings.token_embedding.weight")
        values = dict(max_position_embeddings=shape("embeddings.position_embedding.weight")[0],
                      intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
                      hidden_act="quick_gelu")
    else:
        raise ValueError(f"unknown text arch {arch!r}")
    depth = 1 + max(int(k[len(prefix) + len(layer):].split(".", 1)[0]) for k in weights
                    if k.startswith(prefix + layer))
    return dict(values, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=depth,
                num_attention_heads=max(1, hidden // 64))


def load_text_tokenizer(cfg: ModelConfig):
    """The tokenizer that comes with a pretrained text encoder (hub name or directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.text_pretrained, use_fast=True)
