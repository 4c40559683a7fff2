"""Tiny checkpoints for the tensor-parallel tests, each with a tokenizer so an engine (and a server) can load it."""

from __future__ import annotations

from pathlib import Path

from tests.model_factories import save_tiny_gpt_oss_mxfp4, save_tiny_model
from tests.server_fixtures import save_tokenizer


def save_tp_model(kind: str, directory: Path) -> tuple[Path, int]:
    """`kind`: llama-kv1 (4 heads, 1 KV head: replicated over 2 ranks), llama-kv2 (2 KV heads: split), or
    gpt-oss-mxfp4 (MXFP4 experts of width 64 = two 32-element blocks, sinks, a 5-token sliding window).
    The vocabulary is the tokenizer's (odd sizes test uneven vocab slices). Returns (directory, layers)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(directory, 300)
    if kind == "gpt-oss-mxfp4":
        model = save_tiny_gpt_oss_mxfp4(directory, vocab_size=vocab)
    else:
        kv_heads = {"llama-kv1": 1, "llama-kv2": 2}[kind]
        model = save_tiny_model("llama", directory, num_key_value_heads=kv_heads, vocab_size=vocab,
                                tie_word_embeddings=kv_heads == 1)  # one tied, one separate LM head
    return directory, model.config.num_hidden_layers
