"""gpt-oss mixture of experts on the grouped MXFP4 matmul: three launches, no host sync.

1. routing (`kernels.triton.routing`): top-k + softmax, rows sorted by expert, the row-tile
   schedule, and the zeroing of the fp32 output, in one launch;
2. gate_up + bias + clamped SwiGLU, rows gathered from their tokens, stored in sorted order;
3. down + bias, times the routing weight, added atomically into the token's fp32 output
   row: the top-k combine happens in this epilogue (and small grids may split K).
A cast to the activation dtype ends it. `deterministic=True` trades the atomics for a
fixed summation order: the down projection stores each (token, slot) row and one more
launch (`mxfp4_matmul.sum_row_groups`) sums a token's k rows in slot order.
"""

from __future__ import annotations

import torch

from kernels.mxfp4 import MXFP4Tensor, SwizzledMXFP4
from kernels.ops import Weight
from kernels.triton import mxfp4_matmul, routing


def weight_parts(weight: Weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[E, N, K]` weight as the kernel reads it: (swizzled blocks, scales) or (dense, None)."""
    if isinstance(weight, SwizzledMXFP4):
        return weight.blocks, weight.scales
    if isinstance(weight, MXFP4Tensor):
        raise TypeError("the Triton MXFP4 matmul reads swizzled weights: prepare them once with "
                        "kernels.triton_ops.prepare_weight (kernels.mxfp4.swizzle)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the Triton kernels read dense or swizzled MXFP4 weights, not {type(weight).__name__} "
                        "(prepared by another kernel backend)")
    return weight.contiguous(), None


def _check_shapes(x: torch.Tensor, tokens: int, w_gate_up: Weight, w_down: Weight) -> None:
    num_experts, two_i, hidden = w_gate_up.shape
    if x.shape[-1] != hidden or tuple(w_down.shape) != (num_experts, w_down.shape[1], two_i // 2) or two_i % 2:
        raise ValueError(
            f"moe_experts: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)} and w_down "
            f"{tuple(w_down.shape)} do not chain as [T, H] -> [E, 2I, H] -> [E, H', I]"
        )
    if x.shape[0] != tokens:
        raise ValueError(f"moe_experts: routing for {tokens} tokens does not match x {tuple(x.shape)}")


def _experts(
    x: torch.Tensor,
    top_k: int,
    w_gate_up: Weight,
    b_gate_up: torch.Tensor | None,
    w_down: Weight,
    b_down: torch.Tensor | None,
    alpha: float,
    limit: float,
    deterministic: bool,
    *,
    router_logits: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    expert_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Route (from `router_logits`, or from chosen `expert_ids` and `expert_weights`), then the two grouped
    matmuls."""
    num_experts, two_i, hidden = w_gate_up.shape
    inter, out_hidden, tokens = two_i // 2, w_down.shape[-2], x.shape[0]
    if tokens == 0:
        return torch.zeros(0, out_hidden, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    pairs = tokens * top_k
    rows_per_expert = max(1, pairs // num_experts)
    block_m = mxfp4_matmul.tiles(rows_per_expert, x.device).block_m
    acc = None if deterministic else torch.empty(tokens, out_hidden, dtype=torch.float32, device=x.device)
    r = routing.route(top_k, num_experts, block_m, router_logits=router_logits, expert_ids=expert_ids,
                      expert_weights=expert_weights, zero=acc)
    schedule = (r.tile_expert, r.tile_start, r.expert_end)

    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    mxfp4_matmul.launch(
        x, weight_parts(w_gate_up), b_gate_up, h, two_i, hidden, num_experts,
        a_rows=(r.row_pair, top_k), swiglu=(alpha, limit),
        schedule=schedule, block_m=block_m, rows_per_tile=rows_per_expert,
    )
    if acc is not None:  # not deterministic: the down projection adds into the zeroed fp32 output
        mxfp4_matmul.launch(
            h, weight_parts(w_down), b_down, acc, out_hidden, inter, num_experts,
            out_rows=(r.row_pair, top_k), route_weights=r.row_weight, atomic_add=True,
            schedule=schedule, block_m=block_m, rows_per_tile=rows_per_expert,
        )
        return acc.to(x.dtype)
    y = torch.empty(pairs, out_hidden, dtype=torch.float32, device=x.device)
    mxfp4_matmul.launch(
        h, weight_parts(w_down), b_down, y, out_hidden, inter, num_experts,
        out_rows=(r.row_pair, 1), route_weights=r.row_weight,
        schedule=schedule, block_m=block_m, rows_per_tile=rows_per_expert,
    )
    out = torch.empty(tokens, out_hidden, dtype=x.dtype, device=x.device)
    mxfp4_matmul.sum_row_groups(y, out, top_k)
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
    """Same contract as `kernels.reference.moe_experts`, with the routing already chosen."""
    _check_shapes(x, expert_ids.shape[0], w_gate_up, w_down)
    if expert_weights.shape != expert_ids.shape:
        raise ValueError(f"moe_experts: routing {tuple(expert_ids.shape)} vs weights {tuple(expert_weights.shape)}")
    return _experts(
        x, expert_ids.shape[1], w_gate_up, b_gate_up, w_down, b_down, alpha, limit, deterministic,
        expert_ids=expert_ids, expert_weights=expert_weights,
    )


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
    """Same contract as `kernels.reference.moe`: the top-k routing runs inside the routing launch."""
    _check_shapes(x, router_logits.shape[0], w_gate_up, w_down)
    return _experts(
        x, top_k, w_gate_up, b_gate_up, w_down, b_down, alpha, limit, deterministic, router_logits=router_logits
    )


def linear_mxfp4(
    x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, num_splits: int | None = None
) -> torch.Tensor:
    """`x @ weight.T + bias` for a swizzled MXFP4 `[out, in]` weight (any leading dims on x).

    Grids too small to fill the GPU split K (`num_splits` overrides the choice): two launches.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, k = weight.shape
    if shape[-1] != k:
        raise ValueError(f"linear: x {tuple(shape)} does not match MXFP4 weight [out={n}, in={k}]")
    blocks, scales = weight_parts(weight)  # refuses a checkpoint-layout MXFP4Tensor
    parts = (blocks.view(1, -1), None if scales is None else scales.view(1, -1))
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    bias2 = bias.view(1, n) if bias is not None else None
    splits = num_splits or mxfp4_matmul.split_k(mxfp4_matmul.grid_tiles(x2.shape[0], n, x.device), k, x.device)
    if splits == 1 or x2.shape[0] == 0:
        mxfp4_matmul.launch(x2, parts, bias2, out, n, k, 1)
    else:  # a small grid: K split over more programs, their fp32 partials summed in order and rounded once
        partials = torch.empty(x2.shape[0] * splits, n, dtype=torch.float32, device=x.device)
        mxfp4_matmul.launch(x2, parts, bias2, partials, n, k, 1, num_splits=splits)
        mxfp4_matmul.sum_row_groups(partials, out, splits)
    return out.view(*shape[:-1], n)
