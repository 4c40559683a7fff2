"""Plain-torch reference of every op the models call.

This is the CPU path of the engine and the yardstick the Triton kernels are tested
against. Shapes follow the flat-batch convention: `T` tokens from many sequences,
no padding; `query_start_loc[i]:query_start_loc[i+1]` are sequence i's new tokens,
which are the last tokens of its `seq_lens[i]`-token context.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F

from kernels import routing
from kernels.cpu.quant import QuantizedWeight
from kernels.mxfp4 import MXFP4Tensor
from kernels.ops import Weight

# Rows of an MXFP4 weight dequantized at once: bounds the temporary copy.
_DEQUANT_ROWS = 2048

# Packed MXFP4 weights are dequantized again at every call here, so a model loader
# that can afford dense copies should make them once instead.
DEQUANTIZES_MXFP4_PER_CALL = True

# Decode steps attend all sequences in one padded batch while the padded keys stay this small.
_DECODE_BATCH_ELEMENTS = 2**26


def describe() -> dict[str, object]:
    """The backend's name (its kernels are fixed: nothing is chosen at start-up)."""
    return {"backend": "torch"}


def prepare_weight(weight: Weight) -> Weight:
    """The weight in the layout these ops read, made once at load: the checkpoint's own here."""
    return weight


def quantized_weight(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """None: GGUF-quantized weights are dequantized at load for these ops."""
    return None


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None) -> torch.Tensor: ...
@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]: ...
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32. With `residual`, normalises `x + residual` and also returns that sum."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.float() * h).to(x.dtype)
    return out if residual is None else (out, x)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style (rotate-half) rotary embedding on `[T, heads, head_dim]` q and k.

    `inv_freq` has rotary_dim/2 entries (plain, llama3 and YaRN differ only in it);
    dims past rotary_dim pass through. `mscale` multiplies cos and sin (YaRN).
    """
    rot = inv_freq.numel() * 2
    freqs = positions.float().unsqueeze(-1) * inv_freq.float().unsqueeze(0)  # [T, rot/2]
    cos = (freqs.cos() * mscale).unsqueeze(1)
    sin = (freqs.sin() * mscale).unsqueeze(1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., :rot].float()
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)

    return apply(q), apply(k)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter `[T, kv_heads, head_dim]` k/v into `[blocks, block_size, kv_heads, head_dim]` caches.

    Slot s is block s // block_size, offset s % block_size; slots < 0 are padding. The caches may store a
    narrower dtype than k/v (fp16 or bf16 beside fp32 activations): values are rounded to it (nearest even).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mscale: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`rope` on q and k, then `write_kv_cache` of the rotated k and v; returns the rotated q."""
    q, k = rope(q, k, positions, inv_freq, mscale)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


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
    """Causal attention of new queries `[T, heads, head_dim]` over each sequence's cached keys.

    The new tokens' k/v must already be in the cache, whose dtype may be narrower than q's: its values
    are read as stored and computed on in fp32. Query j of a sequence with
    `q_len` new tokens sits at position `seq_len - q_len + j` and sees keys at
    positions in `(pos - sliding_window, pos]`. `sinks` (one logit per head) join
    the softmax and take probability mass without adding a value.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    lens = seq_lens.tolist()
    if q.shape[0] == len(lens) and q.shape[0] * max(lens, default=0) * num_kv_heads * head_dim <= _DECODE_BATCH_ELEMENTS:
        return _decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, sinks)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(lens):
        q_i = q[starts[i] : starts[i + 1]].float()
        q_len = q_i.shape[0]
        if q_len == 0:
            continue
        n_blocks = -(-seq_len // block_size)
        table = block_tables[i, :n_blocks].long()
        k_i = k_cache[table].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v_i = v_cache[table].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k_i = k_i.repeat_interleave(group, dim=1)
        v_i = v_i.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_i, k_i) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(num_heads, 1, 1).expand(num_heads, q_len, 1)
            probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v_i).to(q.dtype)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """paged_attention when every sequence brings one query: all sequences at once, keys padded to the longest."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    longest = int(seq_lens.max())
    tables = block_tables[:, : -(-longest // block_size)].long().clamp(min=0)  # unused entries are masked below
    k = k_cache[tables].reshape(batch, -1, num_kv_heads, head_dim)[:, :longest].float()
    v = v_cache[tables].reshape(batch, -1, num_kv_heads, head_dim)[:, :longest].float()
    q_grouped = q.float().view(batch, num_kv_heads, group, head_dim)  # query head h reads kv head h // group
    scores = torch.einsum("bkgd,bskd->bkgs", q_grouped, k) * scale
    positions = (seq_lens.long() - 1).unsqueeze(1)
    k_pos = torch.arange(longest, device=q.device).unsqueeze(0)
    allowed = k_pos <= positions
    if sliding_window is not None:
        allowed &= k_pos > positions - sliding_window
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, num_kv_heads, group, 1).expand(batch, -1, -1, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgs,bskd->bkgd", probs, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def _readable(weight: Weight) -> torch.Tensor | MXFP4Tensor:
    """The weight, if it is in a layout these ops read: dense or the checkpoint's MXFP4."""
    if not isinstance(weight, (torch.Tensor, MXFP4Tensor)):
        raise TypeError(f"the torch reference reads dense or MXFP4Tensor weights, not {type(weight).__name__} "
                        "(prepared by another kernel backend)")
    return weight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for a dense `[out, in]` or MXFP4 weight (dequantized a tile at a time)."""
    weight = _readable(weight)
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    out_features = weight.shape[-2]
    pieces = []
    for start in range(0, out_features, _DEQUANT_ROWS):
        tile = weight[start : start + _DEQUANT_ROWS].dequantize(torch.float32)
        pieces.append(x.float() @ tile.T)
    y = torch.cat(pieces, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Llama's SwiGLU on a `[T, 2I]` tensor laid out as [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)


def swiglu_oss(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on a `[T, 2I]` tensor whose gate/up columns interleave."""
    gate = gate_up[..., ::2].float().clamp(max=limit)
    up = gate_up[..., 1::2].float().clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)).to(gate_up.dtype)


def moe_route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token (ties to the lower id), then a softmax over those k logits (gpt-oss's router)."""
    return routing.top_k(router_logits, top_k)


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
    """Mixture of gpt-oss experts: `sum_k weight_k * down_e(swiglu_oss(gate_up_e(x)))`.

    Weights are `[E, out, in]` (dense or MXFP4): `w_gate_up` `[E, 2I, H]` with
    interleaved gate/up rows, `w_down` `[E, H, I]`; biases `[E, out]`. Only the
    experts some token picked are touched, one at a time. The k products are summed
    in fp32 and rounded once. `deterministic` asks a kernel for a fixed summation
    order (no atomics); this path always has one.
    """
    gate_up, down = _readable(w_gate_up), _readable(w_down)
    out = torch.zeros(x.shape[0], down.shape[-2], dtype=torch.float32, device=x.device)
    for e in expert_ids.unique().tolist():
        token_idx, slot = (expert_ids == e).nonzero(as_tuple=True)
        h = linear(x[token_idx], gate_up[e], None if b_gate_up is None else b_gate_up[e])
        h = swiglu_oss(h, alpha, limit)
        h = linear(h, down[e], None if b_down is None else b_down[e])
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
    """`moe_experts` routed by `moe_route(router_logits, top_k)`: the whole gpt-oss MoE after its router."""
    weights, ids = moe_route(router_logits, top_k)
    return moe_experts(x, ids, weights, w_gate_up, b_gate_up, w_down, b_down, alpha, limit, deterministic)
