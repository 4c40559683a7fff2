"""Cut a model into one rank's slice (Megatron-style column/row parallelism), layer by layer as it loads.

- attention: query heads split evenly; KV heads split when there are at least as many as ranks,
  otherwise each rank keeps the one KV head its query heads read (replicated); qkv rows are the
  column-parallel part, o_proj columns the row-parallel part; sinks follow their heads;
- Llama MLP: gate and up rows (column) and down columns (row) split over the intermediate width;
- gpt-oss MoE: every rank holds every expert's slice of the intermediate width (interleaved gate/up
  rows, down columns); MXFP4 down weights are cut between 32-element blocks, so no block is split;
- embedding and LM head: vocab rows split (see ParallelContext.embed / gather_vocab);
- biases added after a row-parallel projection stay on rank 0 only, so the sum counts them once;
- norms and the MoE router are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.distributed.context import ParallelContext
from engine.layers.attention import AttentionWeights, PagedAttention
from engine.layers.mlp import GatedMLP, MoE
from engine.models.decoder import DecoderLayer, DecoderLM
from engine.models.errors import ModelConfigError
from kernels.mxfp4 import BLOCK, MXFP4Tensor
from kernels.ops import Weight


@dataclass(frozen=True)
class HeadSlice:
    """This rank's query heads `[q_begin, q_begin + q_count)` and KV heads `[kv_begin, kv_begin + kv_count)`."""

    q_begin: int
    q_count: int
    kv_begin: int
    kv_count: int


def head_slice(num_heads: int, num_kv_heads: int, ctx: ParallelContext) -> HeadSlice:
    n = ctx.world_size
    if num_heads % n:
        raise ModelConfigError(f"tensor_parallel_size {n} does not divide the {num_heads} attention heads")
    if num_kv_heads % n and n % num_kv_heads:
        raise ModelConfigError(f"tensor_parallel_size {n} and the {num_kv_heads} KV heads must divide one another")
    q_count = num_heads // n
    group = num_heads // num_kv_heads  # query heads per KV head
    q_begin = ctx.rank * q_count
    return HeadSlice(q_begin, q_count, q_begin // group, max(1, num_kv_heads // n))


def width_slice(width: int, ctx: ParallelContext, what: str, multiple: int = 1) -> slice:
    """Rank's share of an intermediate dimension; `multiple` keeps quantization blocks whole."""
    n = ctx.world_size
    if width % (n * multiple):
        raise ModelConfigError(f"tensor_parallel_size {n} does not split {what} ({width}) "
                               f"into equal parts of a multiple of {multiple}")
    share = width // n
    return slice(ctx.rank * share, (ctx.rank + 1) * share)


def _own(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A compact copy on `device`: a view would keep the whole unsharded tensor alive."""
    return t.to(device, copy=True).contiguous()


def _dense(w: Weight) -> torch.Tensor:
    """The weight as the model loaded it for slicing (dense: `build_model(keep_quantized=False)`, before
    `prepare_weight`); refuses a layout whose rows cannot be cut like a tensor's."""
    if not isinstance(w, torch.Tensor):
        raise ModelConfigError(f"tensor parallelism slices dense weights, not {type(w).__name__}")
    return w


def _rows(t: torch.Tensor | None, s: slice, device: torch.device) -> torch.Tensor | None:
    return None if t is None else _own(t[s], device)


def _attention(att: PagedAttention, ctx: ParallelContext, device: torch.device) -> PagedAttention:
    heads = head_slice(att.num_heads, att.num_kv_heads, ctx)
    d = att.head_dim
    q_size, kv_size = att.num_heads * d, att.num_kv_heads * d
    q = slice(heads.q_begin * d, (heads.q_begin + heads.q_count) * d)
    kv = slice(heads.kv_begin * d, (heads.kv_begin + heads.kv_count) * d)
    k = slice(q_size + kv.start, q_size + kv.stop)
    v = slice(q_size + kv_size + kv.start, q_size + kv_size + kv.stop)

    def qkv_rows(t: torch.Tensor) -> torch.Tensor:
        return _own(torch.cat((t[q], t[k], t[v])), device)

    w = att.w
    weights = AttentionWeights(
        qkv=qkv_rows(_dense(w.qkv)),
        o=_own(_dense(w.o)[:, q], device),
        qkv_bias=None if w.qkv_bias is None else qkv_rows(w.qkv_bias),
        o_bias=_rows(w.o_bias, slice(None), device) if ctx.rank == 0 else None,
        sinks=_rows(w.sinks, slice(heads.q_begin, heads.q_begin + heads.q_count), device),
    )
    return PagedAttention(weights, heads.q_count, heads.kv_count, d, att.rotary.to(device), att.sliding_window,
                          att.ops)


def _gated_mlp(mlp: GatedMLP, ctx: ParallelContext, device: torch.device) -> GatedMLP:
    rows, down = _dense(mlp.gate_up), _dense(mlp.down)
    width = down.shape[1]
    s = width_slice(width, ctx, "intermediate_size")
    gate_up = torch.cat((rows[s], rows[width + s.start:width + s.stop]))
    return GatedMLP(gate_up=_own(gate_up, device), down=_own(down[:, s], device), ops=mlp.ops)


def _expert_rows(w: Weight, s: slice, device: torch.device) -> Weight:
    """`[E, out, in]` rows `s` of every expert (packed weights keep their blocks: a row is whole blocks)."""
    if isinstance(w, MXFP4Tensor):
        return MXFP4Tensor(_own(w.blocks[:, s], device), _own(w.scales[:, s], device))
    return _own(_dense(w)[:, s], device)


def _expert_columns(w: Weight, s: slice, device: torch.device) -> Weight:
    """`[E, out, in]` input columns `s` of every expert; packed weights are cut between 32-element blocks."""
    if isinstance(w, MXFP4Tensor):
        blocks = slice(s.start // BLOCK, s.stop // BLOCK)
        return MXFP4Tensor(_own(w.blocks[:, :, blocks], device), _own(w.scales[:, :, blocks], device))
    return _own(_dense(w)[:, :, s], device)


def _moe(moe: MoE, ctx: ParallelContext, device: torch.device) -> MoE:
    width = moe.down.shape[-1]
    packed = isinstance(moe.down, MXFP4Tensor)
    s = width_slice(width, ctx, "the expert intermediate_size", BLOCK if packed else 1)
    pairs = slice(2 * s.start, 2 * s.stop)  # gate/up rows interleave: intermediate unit i is rows 2i, 2i+1
    down_bias = moe.down_bias if ctx.rank == 0 else torch.zeros_like(moe.down_bias)
    return replace(
        moe,
        router=moe.router.to(device),
        router_bias=moe.router_bias.to(device),
        gate_up=_expert_rows(moe.gate_up, pairs, device),
        gate_up_bias=_own(moe.gate_up_bias[:, pairs], device),
        down=_expert_columns(moe.down, s, device),
        down_bias=down_bias.to(device),
    )


def _mlp(mlp: GatedMLP | MoE, ctx: ParallelContext, device: torch.device) -> GatedMLP | MoE:
    if isinstance(mlp, GatedMLP):
        return _gated_mlp(mlp, ctx, device)
    return _moe(mlp, ctx, device)


def slice_layer(layer: DecoderLayer, ctx: ParallelContext, device: torch.device) -> DecoderLayer:
    """This rank's slice of one whole layer, on `device` (build_model's `place_layer` hook)."""
    return DecoderLayer(
        input_norm=layer.input_norm.to(device),
        attention=_attention(layer.attention, ctx, device),
        post_attention_norm=layer.post_attention_norm.to(device),
        mlp=_mlp(layer.mlp, ctx, device),
    )


def slice_vocab(model: DecoderLM, ctx: ParallelContext, device: torch.device) -> DecoderLM:
    """The rank's model: `model`'s layers (already sliced by `slice_layer`) with its vocabulary rows of the
    embedding and LM head, joined by `ctx`."""
    vocab = slice(*ctx.vocab_range(model.vocab_size))
    embed = _own(_dense(model.embed)[vocab], device)
    lm_head = embed if model.lm_head is model.embed else _own(_dense(model.lm_head)[vocab], device)
    sliced = DecoderLM(model.spec, embed, model.layers, model.final_norm.to(device), lm_head, model.ops, parallel=ctx)
    sliced.num_kv_heads = model.layers[0].attention.num_kv_heads
    return sliced
