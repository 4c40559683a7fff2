"""The Triton path of every op the models call: same names and signatures as `kernels.reference`.

`kernels.select_ops` swaps this module in on CUDA. Dense bf16 linears stay on
cuBLAS (`F.linear`), which Triton does not beat; MXFP4 weights, attention, the KV
cache, norms, rotary, activations, the MoE routing and the grouped MoE run Triton
kernels. `moe_route` alone (top-k of a few dozen logits, for callers that want the
choice itself) stays in torch; `moe` routes inside its own routing launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.mxfp4 import MXFP4Tensor, swizzle
from kernels.ops import Weight
from kernels.reference import moe_route, quantized_weight
from kernels.triton.activation import silu_and_mul, swiglu_oss
from kernels.triton.attention import paged_attention
from kernels.triton.kv_cache import write_kv_cache
from kernels.triton.moe import linear_mxfp4, moe, moe_experts
from kernels.triton.norm import rms_norm
from kernels.triton.rope import rope, rope_write_kv

# The MXFP4 kernels read packed FP4 and dequantize in registers: no dense copy is worth making.
DEQUANTIZES_MXFP4_PER_CALL = False

__all__ = [
    "rms_norm",
    "rope",
    "write_kv_cache",
    "rope_write_kv",
    "paged_attention",
    "linear",
    "silu_and_mul",
    "swiglu_oss",
    "moe_route",
    "moe_experts",
    "moe",
    "prepare_weight",
    "quantized_weight",
    "describe",
    "DEQUANTIZES_MXFP4_PER_CALL",
]


def describe() -> dict[str, object]:
    """The backend's name (its kernels are fixed: nothing is chosen at start-up)."""
    return {"backend": "triton"}


def prepare_weight(weight: Weight) -> Weight:
    """MXFP4 weights swizzled into the matmul's tile layout (`kernels.mxfp4.SwizzledMXFP4`), once at load."""
    return swizzle(weight) if isinstance(weight, MXFP4Tensor) else weight


def linear(
    x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None, num_splits: int | None = None
) -> torch.Tensor:
    """`x @ weight.T + bias` for a dense `[out, in]` weight (cuBLAS) or a swizzled MXFP4 one (Triton;
    `num_splits` overrides its split-K choice)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return linear_mxfp4(x, weight, bias, num_splits)
