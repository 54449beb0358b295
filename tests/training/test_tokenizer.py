"""The WordPiece tokenizer trained on captions: special tokens, BERT's [CLS] ... [SEP] layout,
the same vocabulary from the same captions, and round trips through JSON and a directory."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovseg.training.tokenizer import (  # noqa: E402
    SPECIAL_TOKENS, load_tokenizer, tokenizer_from_json, tokenizer_to_json, train_wordpiece,
)

CAPTIONS = ["A photo of a Red circle", "a blue square next to a star", "a dog and a person on the beach",
            "two people and a dog", "a star above a square"] * 3


def test_trained_tokenizer_has_the_bert_special_tokens_and_wraps_text_in_cls_sep():
    tok = train_wordpiece(CAPTIONS, vocab_size=120, min_frequency=1)
    assert tok.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    assert (tok.pad_token, tok.mask_token, tok.cls_token, tok.sep_token, tok.unk_token) == (
        "[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]")
    ids = tok("a Red circle")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert tok.convert_ids_to_tokens(tok("a [MASK] circle")["input_ids"])[2] == "[MASK]"


def test_unseen_words_split_into_known_pieces_not_unknown():
    tok = train_wordpiece(CAPTIONS, vocab_size=120, min_frequency=1)
    pieces = tok.tokenize("squares")
    assert "[UNK]" not in pieces and pieces[0] == "square"


def test_same_captions_give_the_same_vocabulary_and_size_is_respected():
    a = train_wordpiece(CAPTIONS, vocab_size=60, min_frequency=1)
    b = train_wordpiece(list(reversed(CAPTIONS)), vocab_size=60, min_frequency=1)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 60 or len(a) == len(SPECIAL_TOKENS) + 2 * len({c for t in CAPTIONS for c in t.lower() if c != " "})


def test_tokenizer_round_trips_through_json_and_a_directory(tmp_path):
    tok = train_wordpiece(CAPTIONS, vocab_size=120, min_frequency=1)
    text = "a person and a dog on the beach"
    again = tokenizer_from_json(tokenizer_to_json(tok))
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.mask_token_id == tok.mask_token_id
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded(text)["input_ids"] == tok(text)["input_ids"] and loaded.pad_token_id == tok.pad_token_id
    (tmp_path / "tokenizer.json").write_text(tokenizer_to_json(tok))
    assert load_tokenizer(tmp_path / "tokenizer.json")(text)["input_ids"] == tok(text)["input_ids"]
