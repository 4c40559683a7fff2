"""RMSNorm, optionally fused with the residual add: one program normalises one row in fp32."""

from __future__ import annotations

from typing import overload

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    n_cols, stride_x, stride_r, stride_o, stride_s, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype first, as the model's residual stream is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * (h * inv_rms)).to(out_ptr.dtype.element_ty), mask=mask)


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None) -> torch.Tensor: ...
@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]: ...
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.reference.rms_norm`; mismatched shapes raise ValueError."""
    shape = x.shape
    if weight.shape != shape[-1:]:
        raise ValueError(f"rms_norm weight {tuple(weight.shape)} does not match hidden size {shape[-1]}")
    if residual is not None and residual.shape != shape:
        raise ValueError(f"rms_norm residual {tuple(residual.shape)} does not match x {tuple(shape)}")
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, shape[-1])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        summed = torch.empty_like(out)
    else:
        r2, summed = x2, out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, summed,
            shape[-1], x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(shape[-1]),
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), summed.view(shape)
