"""The seam between the engine and a model: what the model runner may rely on."""

from __future__ import annotations

from typing import Protocol

import torch

from engine.attention_metadata import AttentionMetadata
from engine.models.decoder import LayerSpan


class CausalLM(Protocol):
    """A decoder-only model running over a paged KV cache.

    The model runner allocates one `(k_cache, v_cache)` pair per layer, each
    `[num_blocks, block_size, num_kv_heads, head_dim]` of `kv_cache_dtype`, and
    binds them once; every `forward` writes the new tokens' keys and values into
    them through `attn_metadata.slot_mapping` and attends through the block tables.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def kv_cache_dtype(self) -> torch.dtype: ...

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None: ...

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Logits `[len(logits_indices) or T, vocab]` in float32."""
        ...

    def forward_span(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata, span: LayerSpan
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """`forward` with the batch's last sequence running only `span`'s layers: the logits of the rows that ran
        the last layer, and that sequence's state after `span.end` (None when it ran the last layer)."""
        ...
