"""MoE routing in one launch: top-k + softmax, expert counts, prefix sums, sorted rows, tile schedule.

Contract and torch reference: `kernels.routing`. Program 0 does the routing; it walks
the tokens `BLOCK_T` at a time twice (count, then place), so it has no size limit and
never syncs with the host. Any further programs zero the fp32 buffer the grouped down
projection accumulates into, which saves the MoE a separate fill launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.routing import Routing, max_tiles

_ZERO_BLOCK = 4096


@triton.jit
def _choose(
    logits_ptr, ids_in_ptr, weights_in_ptr, t0, T, num_experts, stride_l,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
):
    """(ids, weights, valid) `[BLOCK_T, K_PAD]` of tokens t0..t0+BLOCK_T: picked from logits or read."""
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    slot = tl.arange(0, K_PAD)
    valid = row_ok[:, None] & (slot[None, :] < TOP_K)
    if FROM_LOGITS:
        e = tl.arange(0, BLOCK_E)
        x = tl.load(
            logits_ptr + rows.to(tl.int64)[:, None] * stride_l + e[None, :],
            mask=row_ok[:, None] & (e[None, :] < num_experts), other=float("-inf"),
        ).to(tl.float32)
        ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
        values = tl.full([BLOCK_T, K_PAD], float("-inf"), tl.float32)
        for s in tl.static_range(TOP_K):
            best = tl.max(x, axis=1)
            # the lowest expert id among equal maxima: ties resolve as a stable sort would
            pick = tl.min(tl.where(x == best[:, None], e[None, :], BLOCK_E), axis=1)
            ids = tl.where(slot[None, :] == s, pick[:, None], ids)
            values = tl.where(slot[None, :] == s, best[:, None], values)
            x = tl.where(e[None, :] == pick[:, None], float("-inf"), x)
        top = tl.max(values, axis=1)
        top = tl.where(row_ok, top, 0.0)  # padding rows: keep the arithmetic finite
        p = tl.where(valid, tl.exp(values - top[:, None]), 0.0)
        weights = p / tl.where(row_ok, tl.sum(p, axis=1), 1.0)[:, None]
    else:
        offs = rows.to(tl.int64)[:, None] * TOP_K + slot[None, :]
        ids = tl.load(ids_in_ptr + offs, mask=valid, other=0).to(tl.int32)
        weights = tl.load(weights_in_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return ids, weights, valid


@triton.jit
def _routing_kernel(
    logits_ptr, ids_in_ptr, weights_in_ptr,
    ids_ptr, weights_ptr, row_pair_ptr, row_weight_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
    zero_ptr, zero_numel,
    T, num_experts, num_tiles, stride_l,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_TILES: tl.constexpr, FROM_LOGITS: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid > 0:
        offs = (pid - 1).to(tl.int64) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(zero_ptr + offs, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs < zero_numel)
    else:
        e = tl.arange(0, BLOCK_E)
        e_ok = e < num_experts
        slot = tl.arange(0, K_PAD)
        # Pass 1: choose, store the choice, count rows per expert.
        counts = tl.zeros([BLOCK_E], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            ids, weights, valid = _choose(
                logits_ptr, ids_in_ptr, weights_in_ptr, t0, T, num_experts, stride_l,
                TOP_K, K_PAD, BLOCK_T, BLOCK_E, FROM_LOGITS,
            )
            offs = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None] * TOP_K + slot[None, :]
            tl.store(ids_ptr + offs, ids, mask=valid)
            tl.store(weights_ptr + offs, weights, mask=valid)
            hits = ((ids[:, :, None] == e[None, None, :]) & valid[:, :, None]).to(tl.int32)
            counts += tl.sum(tl.sum(hits, axis=0), axis=0)
        # Prefix sums: each expert's rows, then its row tiles.
        ends = tl.cumsum(counts, axis=0)
        starts = ends - counts
        tl.store(expert_end_ptr + e, ends, mask=e_ok)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        tile_end = tl.cumsum(tiles, axis=0)
        first_tile = tile_end - tiles
        for j0 in range(0, num_tiles, BLOCK_TILES):
            j = j0 + tl.arange(0, BLOCK_TILES)
            expert = tl.sum(((tile_end[None, :] <= j[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
            mine = (e[None, :] == expert[:, None]) & e_ok[None, :]  # unused tiles: no expert, start 0
            start = tl.sum(tl.where(mine, starts[None, :] + (j[:, None] - first_tile[None, :]) * BLOCK_M, 0), axis=1)
            tl.store(tile_expert_ptr + j, expert, mask=j < num_tiles)
            tl.store(tile_start_ptr + j, start, mask=j < num_tiles)
        # Pass 2: place each (token, slot) pair at its expert's next free row, in pair order.
        placed = tl.zeros([BLOCK_E], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            ids, weights, valid = _choose(
                logits_ptr, ids_in_ptr, weights_in_ptr, t0, T, num_experts, stride_l,
                TOP_K, K_PAD, BLOCK_T, BLOCK_E, FROM_LOGITS,
            )
            flat_ids = tl.reshape(ids, [BLOCK_T * K_PAD])
            flat_ok = tl.reshape(valid, [BLOCK_T * K_PAD])
            flat_w = tl.reshape(weights, [BLOCK_T * K_PAD])
            hits = ((flat_ids[:, None] == e[None, :]) & flat_ok[:, None]).to(tl.int32)
            before = tl.cumsum(hits, axis=0) - hits  # earlier pairs of this chunk with the same expert
            row = tl.sum(hits * (starts + placed)[None, :] + hits * before, axis=1)
            placed += tl.sum(hits, axis=0)
            p = tl.arange(0, BLOCK_T * K_PAD)
            pair = (t0 + p // K_PAD) * TOP_K + p % K_PAD
            tl.store(row_pair_ptr + row, pair, mask=flat_ok)
            tl.store(row_weight_ptr + row, flat_w, mask=flat_ok)


def route(
    top_k: int,
    num_experts: int,
    block_m: int,
    *,
    router_logits: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    expert_weights: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> Routing:
    """`kernels.routing.Routing` from router logits (top-k + softmax here) or from chosen ids and weights.

    `zero`, a contiguous fp32 tensor, is filled with zeros by the same launch.
    """
    if router_logits is not None:
        tokens = router_logits.shape[0]
        if router_logits.shape[1] != num_experts or not 0 < top_k <= num_experts:
            raise ValueError(f"route: logits {tuple(router_logits.shape)} do not fit top-{top_k} of {num_experts}")
        if router_logits.stride(-1) != 1:
            router_logits = router_logits.contiguous()
        device = router_logits.device
    else:
        tokens = expert_ids.shape[0]
        expert_ids, expert_weights = expert_ids.contiguous(), expert_weights.contiguous()
        device = expert_ids.device
    pairs = tokens * top_k
    num_tiles = max_tiles(pairs, num_experts, block_m)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    row_pair = torch.empty(pairs, dtype=torch.int32, device=device)
    row_weight = torch.empty(pairs, dtype=torch.float32, device=device)
    tile_expert = torch.empty(num_tiles, dtype=torch.int32, device=device)
    tile_start = torch.empty(num_tiles, dtype=torch.int32, device=device)
    expert_end = torch.empty(num_experts, dtype=torch.int32, device=device)
    zero_numel = zero.numel() if zero is not None else 0
    k_pad = triton.next_power_of_2(top_k)
    block_e = triton.next_power_of_2(num_experts)
    # Token chunks whose (token, slot, expert) one-hot tile has at most 4096 entries.
    block_t = max(1, min(triton.next_power_of_2(max(tokens, 1)), 4096 // (k_pad * block_e)))
    source = router_logits if router_logits is not None else ids
    _routing_kernel[(1 + triton.cdiv(zero_numel, _ZERO_BLOCK),)](
        source, expert_ids if expert_ids is not None else ids,
        expert_weights if expert_weights is not None else weights,
        ids, weights, row_pair, row_weight, tile_expert, tile_start, expert_end,
        zero if zero is not None else weights, zero_numel,
        tokens, num_experts, num_tiles, source.stride(0),
        TOP_K=top_k, K_PAD=k_pad, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_M=block_m,
        BLOCK_TILES=min(64, triton.next_power_of_2(max(num_tiles, 1))), FROM_LOGITS=router_logits is not None,
        ZERO_BLOCK=_ZERO_BLOCK,
    )
    return Routing(ids, weights, row_pair, row_weight, tile_expert, tile_start, expert_end)
