"""Rotary embedding (NeoX rotate-half): plain, llama3 and YaRN differ only in inv_freq and mscale.

One program rotates a block of heads of one token; cos/sin are computed in registers
from the position and `inv_freq` once per token, so no cos/sin cache has to match the
position range. `rope_write_kv` fuses the rotation with the paged KV-cache write: one
launch rotates q, rotates k straight into its cache slot and copies v beside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src, dst, h, num_heads, stride_sh, stride_dh, pos, inv_freq_ptr, head_dim, half, mscale,
    ROUND_TO: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rotate heads `h` ([BLOCK_H, 1]) of one token from `src` to `dst`; results pass through `ROUND_TO` first."""
    i = tl.arange(0, BLOCK_HALF)[None, :]
    rot_mask = (h < num_heads) & (i < half)
    freq = pos.to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < half, other=0.0)
    cos = tl.cos(freq) * mscale  # once per token, shared by its heads
    sin = tl.sin(freq) * mscale
    x1 = tl.load(src + h * stride_sh + i, mask=rot_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * stride_sh + half + i, mask=rot_mask, other=0.0).to(tl.float32)
    out_type = dst.dtype.element_ty
    tl.store(dst + h * stride_dh + i, (x1 * cos - x2 * sin).to(ROUND_TO).to(out_type), mask=rot_mask)
    tl.store(dst + h * stride_dh + half + i, (x2 * cos + x1 * sin).to(ROUND_TO).to(out_type), mask=rot_mask)
    # Dims past the rotary part pass through unchanged.
    d = tl.arange(0, BLOCK_D)[None, :]
    rest = (h < num_heads) & (d >= 2 * half) & (d < head_dim)
    tl.store(dst + h * stride_dh + d, tl.load(src + h * stride_sh + d, mask=rest).to(out_type), mask=rest)


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, pos_ptr, inv_freq_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, num_heads, head_dim, half, mscale,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    _rotate_heads(
        x_ptr + token * stride_xt, out_ptr + token * stride_ot, h, num_heads, stride_xh, stride_oh,
        tl.load(pos_ptr + token), inv_freq_ptr, head_dim, half, mscale,
        out_ptr.dtype.element_ty, BLOCK_HALF, BLOCK_D,
    )


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, inv_freq_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cs, stride_ch,
    num_heads, num_kv_heads, head_dim, half, mscale,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)  # 0: q, 1: k into the cache, 2: v into the cache
    pos = tl.load(pos_ptr + token)
    if part == 0:
        _rotate_heads(
            q_ptr + token * stride_qt, q_out_ptr + token * stride_ot, tl.arange(0, BLOCK_HQ)[:, None], num_heads,
            stride_qh, stride_oh, pos, inv_freq_ptr, head_dim, half, mscale,
            q_out_ptr.dtype.element_ty, BLOCK_HALF, BLOCK_D,
        )
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:  # slot -1 marks a padding token
            h = tl.arange(0, BLOCK_HKV)[:, None]
            if part == 1:
                # Rounded to k's dtype first, as rotating then writing separately would.
                _rotate_heads(
                    k_ptr + token * stride_kt, k_cache_ptr + slot * stride_cs, h, num_kv_heads, stride_kh, stride_ch,
                    pos, inv_freq_ptr, head_dim, half, mscale, k_ptr.dtype.element_ty, BLOCK_HALF, BLOCK_D,
                )
            else:
                d = tl.arange(0, BLOCK_D)[None, :]
                mask = (h < num_kv_heads) & (d < head_dim)
                v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
                tl.store(v_cache_ptr + slot * stride_cs + h * stride_ch + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.shape[0] != positions.shape[0] or 2 * inv_freq.numel() > x.shape[2]:
            raise ValueError(
                f"rope needs {name} [tokens={positions.shape[0]}, heads, head_dim >= {2 * inv_freq.numel()}], "
                f"got {tuple(x.shape)}"
            )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float) -> torch.Tensor:
    x = _last_dim_contiguous(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    tokens, heads, head_dim = x.shape
    half = inv_freq.numel()
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_d))
    if tokens and heads:
        _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
            x, out, positions, inv_freq,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), heads, head_dim, half, float(mscale),
            BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=block_d,
        )
    return out


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.reference.rope`; mismatched shapes raise ValueError."""
    _check(q, k, positions, inv_freq)
    inv_freq = inv_freq.float().contiguous()
    positions = positions.contiguous()
    return _rotate(q, positions, inv_freq, mscale), _rotate(k, positions, inv_freq, mscale)


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
    """Same contract as `kernels.reference.rope_write_kv`, in one launch."""
    _check(q, k, positions, inv_freq)
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if v.shape != k.shape or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"rope_write_kv: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_write_kv needs contiguous [blocks, block_size, kv_heads, head_dim] caches")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"rope_write_kv: slot_mapping {tuple(slot_mapping.shape)} needs one slot per token ({tokens})")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    inv_freq = inv_freq.float().contiguous()
    _rope_write_kv_kernel[(tokens, 3)](
        q, k, v, out, k_cache, v_cache, positions.contiguous(), inv_freq, slot_mapping.contiguous(),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), num_heads, num_kv_heads, head_dim, inv_freq.numel(), float(mscale),
        BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(inv_freq.numel()), BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
