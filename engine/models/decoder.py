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


@dataclass
class LayerSpan:
    """This step's part of a prompt chunk split across steps (`DecoderLM.forward_span`): the batch's last `num_rows`
    tokens run layers `start` to `end - 1`, entering with `carried`, the (hidden, residual) that the chunk's
    previous step left after layer `start - 1` (None when `start` is 0)."""

    start: int
    end: int
    num_rows: int
    carried: tuple[torch.Tensor, torch.Tensor] | None = None


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
        self.kv_cache_dtype = self.dtype  # the builder may store keys and values narrower (engine/builder.kv_cache_dtype)

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
        hidden, residual = self._embed(input_ids), None
        for index in range(self.num_layers):
            hidden, residual = self._layer(index, hidden, residual, positions, attn_metadata)
        return self._logits(hidden, residual, attn_metadata)

    @torch.no_grad()
    def forward_span(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata, span: LayerSpan
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """`forward`, where the batch's last sequence (`span.num_rows` tokens) runs only layers `span.start` to
        `span.end - 1`, so a long prompt chunk spreads its cost over several steps beside running decodes.
        The logits of the rows that reached the last layer, and the chunk's state after `span.end`
        (None when that was the last layer)."""
        main = input_ids.shape[0] - span.num_rows
        apart = attn_metadata.without_last(span.num_rows)  # for the layers the chunk does not run
        hidden, residual = self._embed(input_ids if span.start == 0 else input_ids[:main]), None
        carried = None
        for index in range(self.num_layers):
            if index == span.start and span.carried is not None:
                hidden, residual = _join(hidden, residual, span.carried)
            elif index == span.end:
                assert residual is not None, "the chunk ran at least one layer"
                carried = (hidden[main:].clone(), residual[main:].clone())
                hidden, residual = hidden[:main], residual[:main]
            joined = span.start <= index < span.end
            if hidden.shape[0]:  # no decodes beside the chunk: its rows alone, only in its layers
                hidden, residual = self._layer(index, hidden, residual, positions if joined else positions[:main],
                                               attn_metadata if joined else apart)
        if hidden.shape[0] == 0:
            return hidden.new_zeros((0, self.vocab_size), dtype=torch.float32), carried
        return self._logits(hidden, residual, attn_metadata), carried

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.kv_caches:
            raise RuntimeError("bind_kv_caches must be called before forward")
        return self.parallel.embed(self.embed, input_ids, self.vocab_size).to(self.dtype)

    def _layer(self, index: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
               attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index` on `hidden` (its output not yet added to `residual`; None: the embedding, nothing to add)."""
        ops, eps, parallel, layer = self.ops, self.spec.rms_norm_eps, self.parallel, self.layers[index]
        if residual is None:
            x, residual = ops.rms_norm(hidden, layer.input_norm, eps), hidden
        else:
            x, residual = ops.rms_norm(hidden, layer.input_norm, eps, residual)
        hidden = parallel.all_reduce(layer.attention(x, positions, attn_metadata, self.kv_caches[index]))
        x, residual = ops.rms_norm(hidden, layer.post_attention_norm, eps, residual)
        return parallel.all_reduce(layer.mlp(x)), residual

    def _logits(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        assert residual is not None, "a model has at least one layer"
        x, _ = self.ops.rms_norm(hidden, self.final_norm, self.spec.rms_norm_eps, residual)
        if attn_metadata.logits_indices is not None:
            x = x[attn_metadata.logits_indices]
        return self.parallel.gather_vocab(self.ops.linear(x, self.lm_head).float(), self.vocab_size)

    __call__ = forward


def _join(hidden: torch.Tensor, residual: torch.Tensor | None,
          carried: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decodes' rows (when any) followed by a split chunk's rows, entering the chunk's first layer of the step."""
    if residual is None:  # no decode rows ran a layer: the chunk's alone
        return carried
    return torch.cat((hidden, carried[0])), torch.cat((residual, carried[1]))
