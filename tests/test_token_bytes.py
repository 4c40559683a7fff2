"""Token bytes from the vocabulary: the bytes of a text's tokens, joined, are the text's UTF-8 (the reference
nobody here wrote is the text itself), for byte-level BPE (HF and GGUF) and SentencePiece byte fallback."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.token_bytes import token_text
from engine.tokenizer import Tokenizer
from test_tokenizer import _gguf_fields

TEXTS = ["naïve café: 3€ — 東京 🦊🦊 fox", "€€€ ∑ü", "plain ascii"]


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE over the full byte alphabet, trained so some tokens hold part of a character."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 3, trainer)
    return Tokenizer(backend, eos_token="</s>")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_token_bytes_rebuild_the_text(text):
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert tokenizer.token_bytes(tokenizer.backend.token_to_id("</s>")) == b"</s>"


def test_partial_characters_have_their_bytes_and_escaped_text():
    tokenizer = byte_level_tokenizer()
    fox = "🦊".encode()
    lone = tokenizer.backend.token_to_id("ð")  # GPT-2's symbol for byte 0xF0: the first byte of 🦊
    assert tokenizer.token_bytes(lone) == fox[:1]
    assert tokenizer.decode([lone]) == "\ufffd"  # what decoding the token alone gives
    assert token_text(fox[:2]) == "\\xf0\\x9f" and token_text("€".encode()) == "€"


def test_gguf_byte_level_vocabulary(tmp_path):
    tokens = ["<s>", "</s>", "h", "i", "Ġ", "Ã", "©", "Ã©", "hi"]
    tokenizer = Tokenizer.from_gguf(_gguf_fields(tmp_path, "gpt2", tokens, merges=["h i", "Ã ©"]))
    ids = tokenizer.encode("hi é", add_special_tokens=False)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == "hi é".encode()


def test_sentencepiece_byte_fallback(tmp_path):
    tokens = ["<s>", "</s>", "\u2581hello", "\u2581", "h", "<0xE2>", "<0x82>", "<0xAC>"]
    scores = [0.0, 0.0, -1.0, -5.0, -10.0, -20.0, -20.0, -20.0]
    tokenizer = Tokenizer.from_gguf(_gguf_fields(tmp_path, "llama", tokens, scores=scores))
    ids = tokenizer.encode("hello €", add_special_tokens=False)
    assert [tokenizer.token_bytes(i) for i in ids] == [b" hello", b" ", b"\xe2", b"\x82", b"\xac"]
