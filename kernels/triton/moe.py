"""gpt-oss mixture of experts on the grouped MXFP4 matmul: route, sort by expert, two launches, combine.

The (token, slot) pairs are sorted by expert on the device (no host sync), a
schedule maps each row tile of the sorted list to its expert, then:
1. gate_up + bias + clamped SwiGLU, rows gathered from the tokens, stored in sorted order;
2. down + bias, times the routing weight, scattered back to pair order;
the k outputs of each token are summed in fp32.
"""

from __future__ import annotations

import torch
import triton

from kernels.mxfp4 import MXFP4Tensor
from kernels.triton import mxfp4_matmul

Weight = torch.Tensor | MXFP4Tensor


def weight_parts(weight: Weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[E, N, K]` weight as the kernel reads it: (packed `[E, N, K/2]`, scales) or (dense, None)."""
    if isinstance(weight, MXFP4Tensor):
        blocks = weight.blocks.contiguous()
        packed = blocks.view(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
        return packed, weight.scales.contiguous()
    return weight.contiguous(), None


def _schedule(
    sorted_experts: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_expert, tile_start, expert_end) for row tiles of `block_m` over expert-sorted pairs.

    The tile count is bounded on the host by `pairs / block_m + experts`; unused tiles
    get expert id `num_experts` and exit at once, so the host never waits on the device
    (and the whole MoE can be captured in a CUDA graph).
    """
    pairs = sorted_experts.shape[0]
    # scatter_add, not bincount: bincount reads the max back to the host, which breaks CUDA graphs.
    counts = torch.zeros(num_experts, dtype=torch.long, device=sorted_experts.device)
    counts.scatter_add_(0, sorted_experts, torch.ones_like(sorted_experts))
    expert_end = torch.cumsum(counts, 0)
    expert_start = expert_end - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = pairs // block_m + min(num_experts, pairs)
    tile_ids = torch.arange(max_tiles, device=sorted_experts.device)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)
    clamped = tile_expert.clamp(max=num_experts - 1)
    first_tile = tile_end[clamped] - tiles[clamped]
    tile_start = expert_start[clamped] + (tile_ids - first_tile) * block_m
    return tile_expert.to(torch.int32), tile_start.to(torch.int32), expert_end.to(torch.int32)


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
) -> torch.Tensor:
    """Same contract as `kernels.reference.moe_experts`, all experts of the layer in one launch per matmul."""
    tokens, top_k = expert_ids.shape
    num_experts, two_i, hidden = w_gate_up.shape
    inter = two_i // 2
    out_hidden = w_down.shape[-2]
    if x.shape[-1] != hidden or tuple(w_down.shape) != (num_experts, w_down.shape[1], inter) or two_i % 2:
        raise ValueError(
            f"moe_experts: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)} and w_down "
            f"{tuple(w_down.shape)} do not chain as [T, H] -> [E, 2I, H] -> [E, H', I]"
        )
    if x.shape[0] != tokens or expert_weights.shape != expert_ids.shape:
        raise ValueError(f"moe_experts: routing {tuple(expert_ids.shape)} does not match x {tuple(x.shape)}")
    if tokens == 0:
        return torch.zeros(0, out_hidden, dtype=x.dtype, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    pairs = tokens * top_k
    flat_experts = expert_ids.reshape(-1).long()
    sorted_experts, order = torch.sort(flat_experts, stable=True)
    order32 = order.to(torch.int32)
    token_of_row = (order // top_k).to(torch.int32)
    route = expert_weights.reshape(-1)[order].float().contiguous()

    rows_per_expert = max(1, pairs // num_experts)
    block_m = mxfp4_matmul._tiles(rows_per_expert, two_i, hidden, x.device)[0]
    schedule = _schedule(sorted_experts, num_experts, block_m)

    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    mxfp4_matmul.launch(
        x, weight_parts(w_gate_up), b_gate_up, h, two_i, hidden, num_experts,
        schedule=schedule, a_rows=token_of_row, swiglu=(alpha, limit), block_m=block_m,
        rows_per_tile=rows_per_expert,
    )
    y = torch.empty(pairs, out_hidden, dtype=x.dtype, device=x.device)
    mxfp4_matmul.launch(
        h, weight_parts(w_down), b_down, y, out_hidden, inter, num_experts,
        schedule=schedule, out_rows=order32, route_weights=route, block_m=block_m,
        rows_per_tile=rows_per_expert,
    )
    return y.view(tokens, top_k, out_hidden).float().sum(1).to(x.dtype)


def linear_mxfp4(x: torch.Tensor, weight: MXFP4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` for an MXFP4 `[out, in]` weight (any leading dims on x)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, k = weight.shape
    if shape[-1] != k:
        raise ValueError(f"linear: x {tuple(shape)} does not match MXFP4 weight [out={n}, in={k}]")
    packed, scales = weight_parts(weight)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    bias2 = bias.view(1, n) if bias is not None else None
    mxfp4_matmul.launch(x2, (packed.view(1, n, k // 2), scales.view(1, n, k // 32)), bias2, out, n, k, 1)
    return out.view(*shape[:-1], n)
