"""The text encoder: a BERT-style encoder from transformers, from a hub name (the paper:
bert-base-uncased), a local directory, or a config with random init for small presets."""

from __future__ import annotations

import torch
import torch.nn as nn

from ovseg.training.model.config import ModelConfig


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if cfg.text_pretrained:
            self.bert = AutoModel.from_pretrained(cfg.text_pretrained, add_pooling_layer=False)
        else:
            if tokenizer is None and cfg.text_vocab_size is None:
                raise ValueError("a randomly initialised text encoder needs a tokenizer or model.text_vocab_size")
            if tokenizer is not None and cfg.text_vocab_size and cfg.text_vocab_size < len(tokenizer):
                raise ValueError(f"model.text_vocab_size {cfg.text_vocab_size} is smaller than the tokenizer's "
                                 f"vocabulary ({len(tokenizer)})")
            config = BertConfig(
                vocab_size=cfg.text_vocab_size or len(tokenizer),
                hidden_size=cfg.text_width, num_hidden_layers=cfg.text_depth,
                num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
                max_position_embeddings=max(64, cfg.max_text_length),
                pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
                hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout,
            )
            self.bert = BertModel(config, add_pooling_layer=False)
        self.width = self.bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token features (B, L, C); the first token is [CLS]."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_text_tokenizer(cfg: ModelConfig):
    """The tokenizer that comes with a pretrained text encoder (hub name or directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.text_pretrained, use_fast=True)
