"""DecoderLM: the pre-norm decoder stack every supported architecture runs, over a paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention_metadata import AttentionMetadata
from engine.distributed.context import SINGLE, ParallelContext
from engine.layers.attention import PagedAttention
from engine.layers.mlp import GatedMLP, MoE
from engine.models.errors import ModelConfigError
from engine.models.spec import ModelSpec
from kernels.cpu.quant import QuantizedWeight
from kernels.ops import Ops, Weight


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    attention: PagedAttention
    post_attention_norm: torch.Tensor
    mlp: GatedMLP | MoE


PlaceLayer = Callable[[DecoderLayer], DecoderLayer]  # what a loader does with each layer it has built


def keep_layer(layer: DecoderLayer) -> DecoderLayer:
    return layer


class DecoderLM:
    """Embedding -> N x (norm, attention, norm, MLP/MoE, residuals) -> norm -> unembedding.

    Implements engine.models.base.CausalLM; every op goes through `ops`. Under tensor parallelism
    `parallel` joins the slices: after the embedding, attention and MLP/MoE, and the logits.
    """

    def __init__(
        self,
        spec: ModelSpec,
        embed: torch.Tensor | QuantizedWeight,  # a quantized table dequantizes only the rows looked up
        layers: list[DecoderLayer],
        final_norm: torch.Tensor,
        lm_head: Weight,
        ops: Ops,
        parallel: ParallelContext = SINGLE,
    ) -> None:
        self.spec = spec
        self.embed = embed
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.ops = ops
        self.parallel = parallel  # tensor parallelism: this rank's slice and its collectives (engine/distributed)
        self.num_layers = spec.num_layers
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.vocab_size = spec.vocab_size
        self.dtype = final_norm.dtype  # the embedding may be kept quantized (its rows dequantize on lookup)
        self.device = final_norm.device
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.dtype

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One `(k, v)` pair per layer, each `[num_blocks, block_size, num_kv_heads, head_dim]`."""
        if len(kv_caches) != self.num_layers:
            raise ModelConfigError(f"got {len(kv_caches)} KV cache pairs for {self.num_layers} layers")
        for i, (k, v) in enumerate(kv_caches):
            if k.shape != v.shape or k.dim() != 4 or tuple(k.shape[2:]) != (self.num_kv_heads, self.head_dim):
                raise ModelConfigError(
                    f"layer {i} KV cache shapes {tuple(k.shape)}/{tuple(v.shape)} are not "
                    f"[blocks, block_size, {self.num_kv_heads}, {self.head_dim}]"
                )
        self.kv_caches = list(kv_caches)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Float32 logits `[len(logits_indices) or T, vocab]` for a flat batch of `T` new tokens.

        no_grad rather than inference_mode: callers may modify the logits in place afterwards.
        """
        if not self.kv_caches:
            raise RuntimeError("bind_kv_caches must be called before forward")
        ops, eps, parallel = self.ops, self.spec.rms_norm_eps, self.parallel
        hidden = parallel.embed(self.embed, input_ids, self.vocab_size).to(self.dtype)
        residual = hidden  # the first layer's input: its norm has nothing to add
        for index, (layer, kv_cache) in enumerate(zip(self.layers, self.kv_caches)):
            if index == 0:
                x = ops.rms_norm(hidden, layer.input_norm, eps)
            else:
                x, residual = ops.rms_norm(hidden, layer.input_norm, eps, residual)
            hidden = parallel.all_reduce(layer.attention(x, positions, attn_metadata, kv_cache))
            x, residual = ops.rms_norm(hidden, layer.post_attention_norm, eps, residual)
            hidden = parallel.all_reduce(layer.mlp(x))
        x, _ = ops.rms_norm(hidden, self.final_norm, eps, residual)
        if attn_metadata.logits_indices is not None:
            x = x[attn_metadata.logits_indices]
        return parallel.gather_vocab(ops.linear(x, self.lm_head).float(), self.vocab_size)

    __call__ = forward
