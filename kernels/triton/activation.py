"""Gated activations: Llama's silu_and_mul ([gate | up]) and gpt-oss's clamped SwiGLU (interleaved)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def swiglu_oss_math(gate, up, alpha, limit):
    """gpt-oss's clamped SwiGLU in fp32; shared with the MoE matmul epilogue."""
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * gate * tl.sigmoid(alpha * gate)


@triton.jit
def _gated_kernel(
    x_ptr, out_ptr, n_out, stride_x, stride_o, alpha, limit,
    INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_out
    src = x_ptr + row * stride_x
    if INTERLEAVED:
        gate = tl.load(src + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(src + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        y = swiglu_oss_math(gate, up, alpha, limit)
    else:
        gate = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(src + n_out + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _gated(gate_up: torch.Tensor, interleaved: bool, alpha: float = 0.0, limit: float = 0.0) -> torch.Tensor:
    shape = gate_up.shape
    x = gate_up.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_out = shape[-1] // 2
    out = torch.empty((x.shape[0], n_out), dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] and n_out:
        block = min(_BLOCK, triton.next_power_of_2(n_out))
        grid = (x.shape[0], triton.cdiv(n_out, block))
        _gated_kernel[grid](
            x, out, n_out, x.stride(0), out.stride(0), float(alpha), float(limit),
            INTERLEAVED=interleaved, BLOCK=block,
        )
    return out.view(*shape[:-1], n_out)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as `kernels.reference.silu_and_mul`."""
    return _gated(gate_up, interleaved=False)


def swiglu_oss(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Same contract as `kernels.reference.swiglu_oss`."""
    return _gated(gate_up, interleaved=True, alpha=alpha, limit=limit)
