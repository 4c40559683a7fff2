"""Rotary embedding (NeoX rotate-half): plain, llama3 and YaRN differ only in inv_freq and mscale.

One program rotates a block of heads of one token; cos/sin are computed in registers
from the position and `inv_freq` once per token, so no cos/sin cache has to match the
position range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, pos_ptr, inv_freq_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, num_heads, head_dim, half, mscale,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    src = x_ptr + token * stride_xt + h * stride_xh
    dst = out_ptr + token * stride_ot + h * stride_oh
    i = tl.arange(0, BLOCK_HALF)[None, :]
    rot_mask = (h < num_heads) & (i < half)
    freq = tl.load(pos_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < half, other=0.0)
    cos = tl.cos(freq) * mscale  # once per token, shared by its heads
    sin = tl.sin(freq) * mscale
    x1 = tl.load(src + i, mask=rot_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + i, mask=rot_mask, other=0.0).to(tl.float32)
    tl.store(dst + i, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=rot_mask)
    tl.store(dst + half + i, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=rot_mask)
    # Dims past the rotary part pass through unchanged.
    d = tl.arange(0, BLOCK_D)[None, :]
    rest = (h < num_heads) & (d >= 2 * half) & (d < head_dim)
    tl.store(dst + d, tl.load(src + d, mask=rest), mask=rest)


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
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
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.shape[0] != positions.shape[0] or 2 * inv_freq.numel() > x.shape[2]:
            raise ValueError(
                f"rope needs {name} [tokens={positions.shape[0]}, heads, head_dim >= {2 * inv_freq.numel()}], "
                f"got {tuple(x.shape)}"
            )
    inv_freq = inv_freq.float().contiguous()
    positions = positions.contiguous()
    return _rotate(q, positions, inv_freq, mscale), _rotate(k, positions, inv_freq, mscale)
