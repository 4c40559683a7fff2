"""MoE routing on the device: top-k + softmax, expert counts, prefix sums, sorted rows, tile schedule.

Contract and torch reference: `kernels.routing`. Tokens are taken in chunks of
`BLOCK_T` (a one-hot tile of chunk pairs x experts stays small: 64 tokens for gpt-oss).
Up to four chunks (every decode batch of gpt-oss up to 256 tokens) are routed by ONE
launch: one program walks them twice, choosing and counting, then writes the schedule
and places the pairs. Larger batches (prefill) take two launches whose programs each
own a chunk, so routing time does not grow with the batch: the first chooses and
counts per chunk, the second reads all chunk counts, so each program knows where its
chunk's pairs go, and places them (program 0 also writes the schedule). Either way
nothing is read back to the host and every size is fixed by the shapes (CUDA-graph
safe). Extra programs of the first launch zero the fp32 buffer the grouped down
projection accumulates into, which saves the MoE a separate fill launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.routing import Routing, max_tiles

_ZERO_BLOCK = 4096
# Largest (token, slot, expert) one-hot tile a program builds: bounds the chunk size.
_ONE_HOT = 8192
# Up to this many chunks one program routes the batch in one launch (gpt-oss: 256 tokens).
_ONE_LAUNCH_CHUNKS = 4


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
def _store_choice(ids_ptr, weights_ptr, ids, weights, valid, t0, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr):  # fmt: skip
    offs = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None] * TOP_K + tl.arange(0, K_PAD)[None, :]
    tl.store(ids_ptr + offs, ids, mask=valid)
    tl.store(weights_ptr + offs, weights, mask=valid)


@triton.jit
def _count(ids, valid, BLOCK_E: tl.constexpr):
    """Pairs per expert in a chunk."""
    e = tl.arange(0, BLOCK_E)
    hits = ((ids[:, :, None] == e[None, None, :]) & valid[:, :, None]).to(tl.int32)
    return tl.sum(tl.sum(hits, axis=0), axis=0)


@triton.jit
def _write_schedule(
    counts, num_experts, num_tiles, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_TILES: tl.constexpr,
):
    """From all pairs' per-expert counts: each expert's end row, and each row tile's expert and first row."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
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


@triton.jit
def _place(
    ids, weights, valid, t0, first_row, row_pair_ptr, row_weight_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Store the chunk's pairs at `first_row[expert]` + their rank among its pairs of that expert (pair
    order); returns the chunk's pairs per expert."""
    e = tl.arange(0, BLOCK_E)
    flat_ids = tl.reshape(ids, [BLOCK_T * K_PAD])
    flat_ok = tl.reshape(valid, [BLOCK_T * K_PAD])
    hits = ((flat_ids[:, None] == e[None, :]) & flat_ok[:, None]).to(tl.int32)
    rank = tl.cumsum(hits, axis=0) - hits
    row = tl.sum(hits * (first_row[None, :] + rank), axis=1)
    p = tl.arange(0, BLOCK_T * K_PAD)
    pair = (t0 + p // K_PAD) * TOP_K + p % K_PAD
    tl.store(row_pair_ptr + row, pair, mask=flat_ok)
    tl.store(row_weight_ptr + row, tl.reshape(weights, [BLOCK_T * K_PAD]), mask=flat_ok)
    return tl.sum(hits, axis=0)


@triton.jit
def _zero(zero_ptr, zero_numel, block, ZERO_BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
    tl.store(zero_ptr + offs, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs < zero_numel)


@triton.jit
def _route_one_launch_kernel(
    logits_ptr, ids_in_ptr, weights_in_ptr,
    ids_ptr, weights_ptr, row_pair_ptr, row_weight_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
    zero_ptr, zero_numel,
    T, num_experts, num_tiles, stride_l,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_TILES: tl.constexpr, FROM_LOGITS: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    """All of the routing in program 0, walking the chunks twice (count, then place: the choice is
    made again rather than read back, which would need a barrier); the other programs zero `zero_ptr`."""
    pid = tl.program_id(0)
    if pid > 0:
        _zero(zero_ptr, zero_numel, pid - 1, ZERO_BLOCK)
    else:
        counts = tl.zeros([BLOCK_E], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            ids, weights, valid = _choose(
                logits_ptr, ids_in_ptr, weights_in_ptr, t0, T, num_experts, stride_l,
                TOP_K, K_PAD, BLOCK_T, BLOCK_E, FROM_LOGITS,
            )
            _store_choice(ids_ptr, weights_ptr, ids, weights, valid, t0, TOP_K, K_PAD, BLOCK_T)
            counts += _count(ids, valid, BLOCK_E)
        _write_schedule(
            counts, num_experts, num_tiles, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
            BLOCK_E, BLOCK_M, BLOCK_TILES,
        )
        first_row = tl.cumsum(counts, axis=0) - counts
        for t0 in range(0, T, BLOCK_T):
            ids, weights, valid = _choose(
                logits_ptr, ids_in_ptr, weights_in_ptr, t0, T, num_experts, stride_l,
                TOP_K, K_PAD, BLOCK_T, BLOCK_E, FROM_LOGITS,
            )
            first_row += _place(ids, weights, valid, t0, first_row, row_pair_ptr, row_weight_ptr,
                                TOP_K, K_PAD, BLOCK_T, BLOCK_E)  # fmt: skip


@triton.jit
def _route_count_kernel(
    logits_ptr, ids_in_ptr, weights_in_ptr, ids_ptr, weights_ptr, chunk_counts_ptr, zero_ptr, zero_numel,
    T, num_experts, num_chunks, stride_l,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    FROM_LOGITS: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    """Launch 1 of 2: program c chooses for chunk c and stores its per-expert counts; the rest zero."""
    pid = tl.program_id(0)
    if pid >= num_chunks:
        _zero(zero_ptr, zero_numel, pid - num_chunks, ZERO_BLOCK)
    else:
        t0 = pid * BLOCK_T
        ids, weights, valid = _choose(
            logits_ptr, ids_in_ptr, weights_in_ptr, t0, T, num_experts, stride_l,
            TOP_K, K_PAD, BLOCK_T, BLOCK_E, FROM_LOGITS,
        )
        _store_choice(ids_ptr, weights_ptr, ids, weights, valid, t0, TOP_K, K_PAD, BLOCK_T)
        tl.store(chunk_counts_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E), _count(ids, valid, BLOCK_E))


@triton.jit
def _route_place_kernel(
    ids_ptr, weights_ptr, chunk_counts_ptr,
    row_pair_ptr, row_weight_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
    T, num_experts, num_chunks, num_tiles,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Launch 2 of 2: program c sums all chunks' counts (and those before c) and places chunk c's pairs."""
    chunk = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_E], tl.int32)
    earlier = tl.zeros([BLOCK_E], tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        counts = tl.load(chunk_counts_ptr + c[:, None] * BLOCK_E + e[None, :], mask=(c < num_chunks)[:, None], other=0)
        total += tl.sum(counts, axis=0)
        earlier += tl.sum(tl.where((c < chunk)[:, None], counts, 0), axis=0)
    if chunk == 0:
        _write_schedule(
            total, num_experts, num_tiles, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
            BLOCK_E, BLOCK_M, BLOCK_TILES,
        )
    t0 = chunk * BLOCK_T
    ids, weights, valid = _choose(
        ids_ptr, ids_ptr, weights_ptr, t0, T, num_experts, 0, TOP_K, K_PAD, BLOCK_T, BLOCK_E, False
    )
    _place(ids, weights, valid, t0, tl.cumsum(total, axis=0) - total + earlier, row_pair_ptr, row_weight_ptr,
           TOP_K, K_PAD, BLOCK_T, BLOCK_E)  # fmt: skip


# The placing launch holds a chunk's one-hot placement and the chunk-count sums at once: at 4 warps
# its sm_90 compile (pointers aligned, as launched) spills; at 8 it needs 128 registers/thread.
PLACE_WARPS = 8


def route(
    top_k: int,
    num_experts: int,
    block_m: int,
    *,
    router_logits: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    expert_weights: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    block_t: int | None = None,
) -> Routing:
    """`kernels.routing.Routing` from router logits (top-k + softmax here) or from chosen ids and weights.

    `zero`, a contiguous fp32 tensor, is filled with zeros by the first launch. `block_t`
    (tokens per chunk, a power of two) overrides the size picked from the one-hot bound.
    """
    if router_logits is not None:
        tokens = router_logits.shape[0]
        if router_logits.shape[1] != num_experts or not 0 < top_k <= num_experts:
            raise ValueError(f"route: logits {tuple(router_logits.shape)} do not fit top-{top_k} of {num_experts}")
        if router_logits.stride(-1) != 1:
            router_logits = router_logits.contiguous()
        device = router_logits.device
    elif expert_ids is not None and expert_weights is not None:
        tokens = expert_ids.shape[0]
        expert_ids, expert_weights = expert_ids.contiguous(), expert_weights.contiguous()
        device = expert_ids.device
    else:
        raise ValueError("route: give router_logits, or expert_ids and expert_weights")
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
    zero_blocks = triton.cdiv(zero_numel, _ZERO_BLOCK)
    zero_arg = zero if zero is not None else weights
    k_pad, block_e = triton.next_power_of_2(top_k), triton.next_power_of_2(num_experts)
    block_t = block_t or max(1, _ONE_HOT // (k_pad * block_e))
    source = router_logits if router_logits is not None else ids
    choice = dict(TOP_K=top_k, K_PAD=k_pad, BLOCK_E=block_e, FROM_LOGITS=router_logits is not None)
    ids_in = expert_ids if expert_ids is not None else ids
    weights_in = expert_weights if expert_weights is not None else weights
    tile_blocks = min(64, triton.next_power_of_2(max(num_tiles, 1)))
    chunks = triton.cdiv(tokens, block_t)
    if chunks <= _ONE_LAUNCH_CHUNKS:
        _route_one_launch_kernel[(1 + zero_blocks,)](
            source, ids_in, weights_in, ids, weights, row_pair, row_weight, tile_expert, tile_start, expert_end,
            zero_arg, zero_numel, tokens, num_experts, num_tiles, source.stride(0),
            BLOCK_T=min(block_t, triton.next_power_of_2(max(tokens, 1))), BLOCK_M=block_m, BLOCK_TILES=tile_blocks,
            ZERO_BLOCK=_ZERO_BLOCK, **choice,
        )
    else:
        chunk_counts = torch.empty(chunks, block_e, dtype=torch.int32, device=device)
        _route_count_kernel[(chunks + zero_blocks,)](
            source, ids_in, weights_in, ids, weights, chunk_counts, zero_arg, zero_numel,
            tokens, num_experts, chunks, source.stride(0), BLOCK_T=block_t, ZERO_BLOCK=_ZERO_BLOCK, **choice,
        )
        _route_place_kernel[(chunks,)](
            ids, weights, chunk_counts, row_pair, row_weight, tile_expert, tile_start, expert_end,
            tokens, num_experts, chunks, num_tiles,
            TOP_K=top_k, K_PAD=k_pad, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_M=block_m, BLOCK_TILES=tile_blocks,
            BLOCK_C=min(64, triton.next_power_of_2(chunks)),
            num_warps=PLACE_WARPS,
        )
    return Routing(ids, weights, row_pair, row_weight, tile_expert, tile_start, expert_end)
