"""The CPU path of every op the models call: same names and signatures as `kernels.reference`.

`kernels.select_ops` picks this module on CPU. What differs from the reference:
- GGUF-quantized weights stay quantized (`quantized_weight`) and `linear` reads them with the
  native kernels of kernels/cpu, when the start-up measurement (kernels/cpu/select.py) found
  them faster than dense fp32 on this machine; otherwise weights load dense as before. Packed MXFP4
  experts (gpt-oss) are read the same way, one expert's routed rows at a time (`moe_experts`).
- Attention reads the paged cache in place (native); prompt chunks run torch's SDPA per sequence only
  where the native kernel has no flash-style path for the head size.
- With the native kernels built, fp32 RMSNorm, rotary + KV write, decode attention (read in place
  from the cache blocks) and SwiGLU are one native call each (kernels/cpu/layer_ops.cpp): a decode
  layer is ~10 calls instead of ~60 torch ops. The paged cache may be fp32, fp16 or bf16 (KV_CACHE_DTYPES;
  engine/builder.kv_cache_dtype picks it): keys and values are rounded when written and widened in registers
  when read.
Everything else is the reference's.
"""

from __future__ import annotations

import functools
from typing import overload

import torch
import torch.nn.functional as F

from kernels import reference
from kernels.cpu import extension, select
from kernels.cpu.native import NativeKernels
from kernels.cpu.quant import QuantizedWeight, pack_gguf, pack_mxfp4
from kernels.mxfp4 import MXFP4Tensor
from kernels.ops import Weight
from kernels.reference import moe_route, rope, swiglu_oss, write_kv_cache

# Packed MXFP4 experts are dequantized at every call (a panel at a time by the quantized kernels where the
# plan keeps MXFP4, else whole by the reference), so a loader that can afford dense copies still makes them.
DEQUANTIZES_MXFP4_PER_CALL = True

__all__ = [
    "rms_norm", "rope", "write_kv_cache", "rope_write_kv", "paged_attention", "linear", "silu_and_mul",
    "swiglu_oss", "moe_route", "moe_experts", "moe", "prepare_weight", "quantized_weight", "describe",
    "DEQUANTIZES_MXFP4_PER_CALL",
]  # fmt: skip


def describe() -> dict[str, object]:
    """What this backend runs on this machine (the server's /v1/models metadata): the start-up choice of
    the quantized matmul with its timings, or None when no quantized weight has been loaded."""
    plan = select.chosen()
    return {"backend": "cpu", "quantized_matmul": plan.describe() if plan is not None else None}


def prepare_weight(weight: Weight) -> Weight:
    """MXFP4 experts packed for the quantized kernels where the plan keeps MXFP4 quantized (read in place at
    every call, never dequantized whole); otherwise the checkpoint's own layout, as the reference reads it."""
    if isinstance(weight, MXFP4Tensor) and weight.device.type == "cpu" and "MXFP4" in select.plan().types:
        return pack_mxfp4(weight)
    return weight


def quantized_weight(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """A GGUF tensor's stored blocks kept quantized for `linear`, or None: load it dense."""
    if type_name not in select.plan().types:
        return None
    return pack_gguf(raw, type_name, shape)


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias`; a quantized weight is read in place up to the measured row count; larger
    batches (many streams, verification rows, prefill) go through the tile kernels where the plan chose
    them, else dequantize a cache-sized chunk of rows at a time."""
    if not isinstance(weight, QuantizedWeight):
        return reference.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    plan = select.plan()
    terms = select.TILE_TERMS.get(plan.many_rows)
    if x2.shape[0] <= plan.native_max_rows:
        y = select.native_linear(x2, weight)
    elif terms:
        y = select.tiles_linear(x2, weight, terms)
    else:
        y = select.dequant_linear(x2, weight)
    if bias is not None:
        y += bias.float()
    return y.view(*lead, weight.shape[0]).to(x.dtype)


KV_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # paged caches the native kernels read and write


def _native(*tensors: torch.Tensor, caches: tuple[torch.Tensor, ...] = ()) -> NativeKernels | None:
    """The native kernels when they are built, every tensor is fp32 and the KV caches share a dtype they read,
    else None."""
    if (all(t.dtype == torch.float32 for t in tensors) and all(c.dtype in KV_CACHE_DTYPES for c in caches)
            and len({c.dtype for c in caches}) <= 1):
        return extension.load()
    return None


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None) -> torch.Tensor: ...
@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]: ...
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The reference's RMSNorm (with `residual`, of `x + residual`, also returned) in one native call."""
    native = _native(x, weight, *(() if residual is None else (residual,)))
    if native is None or x.dim() != 2:
        return reference.rms_norm(x, weight, eps, residual)
    out, total = native.rms_norm(x, weight, eps, residual)
    return out if residual is None else (out, total)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, mscale: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """`rope` on q and k, then `write_kv_cache` of the rotated k and v, in one native call; returns the rotated q."""
    native = _native(q, k, v, caches=(k_cache, v_cache))
    if native is None:
        return reference.rope_write_kv(q, k, v, positions, inv_freq, mscale, k_cache, v_cache, slot_mapping)
    return native.rope_write_kv(q, k, v, positions, inv_freq, mscale, k_cache, v_cache, slot_mapping)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Llama's SwiGLU on a `[T, 2I]` tensor laid out as [gate | up]."""
    native = _native(gate_up)
    if native is None or gate_up.dim() != 2:
        return reference.silu_and_mul(gate_up)
    return native.silu_and_mul(gate_up)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference's contract. Without a window or sinks the native kernel reads the paged cache in place:
    decode steps always, prompt chunks where it runs flash-style for this head size (a chunk at 8k context
    then costs its FLOPs instead of a gathered copy of the context per layer: bench/cpu_head_of_line.py);
    elsewhere prompt chunks run SDPA per sequence."""
    if sliding_window is not None or sinks is not None:
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                         sliding_window, sinks)
    native = _native(q, caches=(k_cache, v_cache))
    decode = q.shape[0] == seq_lens.shape[0]  # one query per sequence
    if native is not None and (decode or q.shape[2] in _flash_head_dims()):
        return native.paged_attention(q.contiguous(), k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if decode:
        return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return _sdpa_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


@functools.cache
def _flash_head_dims() -> frozenset[int]:
    return frozenset(extension.require().flash_head_dims())


def _sdpa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Each sequence's new queries over its gathered context with torch's SDPA."""
    lens = seq_lens.tolist()
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(lens):
        q_i = q[starts[i]:starts[i + 1]]
        q_len = q_i.shape[0]
        if q_len == 0:
            continue
        table = block_tables[i, :-(-seq_len // block_size)].long()
        k_i = k_cache[table].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v_i = v_cache[table].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        mask = None
        if q_len != seq_len:  # a chunk after cached context: query j sits at seq_len - q_len + j
            positions = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            mask = torch.arange(seq_len).unsqueeze(0) <= positions
        attended = F.scaled_dot_product_attention(
            q_i.float().transpose(0, 1), k_i.float().transpose(0, 1), v_i.float().transpose(0, 1),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=num_heads != num_kv_heads)
        out[starts[i]:starts[i + 1]] = attended.transpose(0, 1).to(q.dtype)
    return out


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_gate_up: Weight,
    b_gate_up: torch.Tensor | None,
    w_down: Weight,
    b_down: torch.Tensor | None,
    alpha: float = 1.702,
    limit: float = 7.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """The reference's contract; experts packed by `prepare_weight` are multiplied quantized by `linear`
    (the rows routed to one expert at a time), the rest go to the reference."""
    if not (isinstance(w_gate_up, QuantizedWeight) and isinstance(w_down, QuantizedWeight)):
        return reference.moe_experts(x, expert_ids, expert_weights, w_gate_up, b_gate_up, w_down, b_down, alpha, limit,
                                     deterministic)
    out = torch.zeros(x.shape[0], w_down.shape[-2], dtype=torch.float32)
    for e in expert_ids.unique().tolist():
        token_idx, slot = (expert_ids == e).nonzero(as_tuple=True)
        h = linear(x[token_idx], w_gate_up.select_rows(e), None if b_gate_up is None else b_gate_up[e])
        h = linear(swiglu_oss(h, alpha, limit), w_down.select_rows(e), None if b_down is None else b_down[e])
        out.index_add_(0, token_idx, h.float() * expert_weights[token_idx, slot].float().unsqueeze(-1))
    return out.to(x.dtype)


def moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    w_gate_up: Weight,
    b_gate_up: torch.Tensor | None,
    w_down: Weight,
    b_down: torch.Tensor | None,
    alpha: float = 1.702,
    limit: float = 7.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """`moe_experts` routed by `moe_route(router_logits, top_k)`, as the reference's."""
    weights, ids = moe_route(router_logits, top_k)
    return moe_experts(x, ids, weights, w_gate_up, b_gate_up, w_down, b_down, alpha, limit, deterministic)
