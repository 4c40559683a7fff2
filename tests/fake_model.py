"""A CausalLM whose next token is a fixed function of the whole context, read back through the paged KV cache.

Keys store token ids, values store positions; the logits come from what the block tables point at,
so a wrong slot mapping, block table or sequence length changes the tokens.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from engine.attention_metadata import AttentionMetadata
from engine.tokenizer import TextStream


def next_token(context: list[int], vocab_size: int) -> int:
    """The token the fake model predicts after `context` (the test's reference)."""
    return sum((i + 1) * t for i, t in enumerate(context)) * 31 % vocab_size


class FakeModel:
    num_layers = 1
    num_kv_heads = 1
    head_dim = 2
    dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self, vocab_size: int = 97, predict=next_token) -> None:
        self.vocab_size = vocab_size
        self.predict = predict  # (context, vocab_size) -> the next token
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return torch.float64

    def bind_kv_caches(self, kv_caches) -> None:
        self.kv_caches = kv_caches

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[0]
        block_size = k_cache.shape[1]
        flat_k, flat_v = k_cache.view(-1, 2), v_cache.view(-1, 2)
        flat_k[meta.slot_mapping, 0] = input_ids.double()
        flat_v[meta.slot_mapping, 0] = positions.double()
        rows = meta.logits_indices.tolist() if meta.logits_indices is not None else range(len(input_ids))
        ends = meta.query_start_loc[1:].tolist()
        logits = torch.zeros(len(rows), self.vocab_size)
        for out, row in enumerate(rows):
            seq = next(i for i, end in enumerate(ends) if row < end)
            length = int(meta.seq_lens[seq]) - (ends[seq] - 1 - row)
            slots = [int(meta.block_tables[seq, p // block_size]) * block_size + p % block_size for p in range(length)]
            assert flat_v[slots, 0].tolist() == list(range(length)), "KV cache positions scrambled"
            context = [int(t) for t in flat_k[slots, 0].tolist()]
            logits[out, self.predict(context, self.vocab_size)] = 1.0
        return logits


class IdTokenizer:
    """Token ids as text ("<7>"); enough for the engine's detokenizer, whose text stream reads a real
    tokenizers backend: one word per id, joined without spaces."""

    eos_token_ids: list[int] = []

    def __init__(self, vocab_size: int = 4096) -> None:
        self.backend = HFTokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
        self.backend.decoder = decoders.Fuse()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return f"<{token_id}>".encode()

    def text_stream(self, context_ids, skip_special_tokens=True) -> TextStream:
        return TextStream(self.backend, context_ids, skip_special_tokens)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 97 for c in text]


class TensorOpsModel:
    """A CausalLM made only of tensor operations (no host reads), for counting a step's device syncs.

    It writes its keys through the slot mapping and reads them back through the block tables,
    so the runner's metadata is used the way a GPU kernel uses it.
    """

    num_layers = 1
    num_kv_heads = 1
    head_dim = 8
    dtype = torch.float32
    device = torch.device("cpu")
    kv_cache_dtype = torch.float32

    def __init__(self, vocab_size: int = 97, wrap=lambda t: t) -> None:
        self.vocab_size = vocab_size
        generator = torch.Generator().manual_seed(0)
        self.embed = wrap(torch.randn(vocab_size, self.head_dim, generator=generator))
        self.lm_head = wrap(torch.randn(vocab_size, self.head_dim, generator=generator))
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def bind_kv_caches(self, kv_caches) -> None:
        self.kv_caches = kv_caches

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, _ = self.kv_caches[0]
        hidden = self.embed[input_ids] * (1 + positions.unsqueeze(1) * 0.01)
        k_cache.view(-1, self.head_dim).index_copy_(0, meta.slot_mapping, hidden)
        keys = k_cache[meta.block_tables.long()].flatten(1, 4)  # [seqs, context slots * head_dim]
        slots = torch.arange(keys.shape[1] // self.head_dim, device=keys.device)
        visible = (slots < meta.seq_lens.unsqueeze(1)).repeat_interleave(self.head_dim, dim=1)
        context = (keys * visible).mean()
        return (hidden[meta.logits_indices] + context) @ self.lm_head.T
