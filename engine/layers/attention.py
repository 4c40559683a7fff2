"""Self-attention over the paged KV cache: fused qkv projection, rope fused with the cache write, paged
attention, output projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention_metadata import AttentionMetadata
from engine.layers.rotary import Rotary
from kernels.ops import Ops, Weight


@dataclass
class AttentionWeights:
    qkv: Weight  # [q_size + 2 * kv_size, hidden]: q rows, then k, then v
    o: Weight  # [hidden, q_size]
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    sinks: torch.Tensor | None = None  # [num_heads] fp32 (gpt-oss)


class PagedAttention:
    """One layer's attention; GQA, optional sliding window and per-head sink logits."""

    def __init__(
        self,
        weights: AttentionWeights,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: Rotary,
        sliding_window: int | None,
        ops: Ops,
    ) -> None:
        self.w = weights
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary = rotary
        self.sliding_window = sliding_window
        self.scale = head_dim**-0.5
        self.ops = ops

    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.ops.linear(x, self.w.qkv, self.w.qkv_bias)
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        q = self.ops.rope_write_kv(
            q, k, v, positions, self.rotary.inv_freq, self.rotary.mscale, k_cache, v_cache, meta.slot_mapping
        )
        out = self.ops.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            self.sliding_window,
            self.w.sinks,
        )
        return self.ops.linear(out.reshape(tokens, q_size), self.w.o, self.w.o_bias)
