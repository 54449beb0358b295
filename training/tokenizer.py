"""A WordPiece tokenizer trained on the curated captions (offline presets have no hub to fetch
one from), saved with the run and inside every checkpoint as its JSON string."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def train_wordpiece(captions: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2):
    """A lower-casing BERT-style WordPiece tokenizer ([CLS] text [SEP]) learnt from `captions`.

    The vocabulary is the special tokens, every character seen (alone and as a `##`
    continuation, so no word is ever unknown), then whole words by frequency with ties broken
    alphabetically. Unlike the `tokenizers` WordPiece trainer, whose ties fall out of hash-map
    order, the same captions always give the same vocabulary: runs are reproducible."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for caption in captions:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    room = max(0, vocab_size - len(vocab))
    taken = set(vocab)
    ranked = sorted((w for w, n in words.items() if n >= min_frequency and w not in taken), key=lambda w: (-words[w], w))
    vocab += ranked[:room]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    return _wrap(backend)


def tokenizer_from_json(text: str):
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_str(text))


def tokenizer_to_json(tokenizer) -> str:
    return tokenizer.backend_tokenizer.to_str()


def load_tokenizer(path: str | Path):
    """A tokenizer from a directory (`save_pretrained` layout) or a tokenizer.json file."""
    path = Path(path)
    if path.is_file():
        return tokenizer_from_json(path.read_text())
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)
