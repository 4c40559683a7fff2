"""Paged attention: one kernel for prefill, chunked prefill and decode, with split-K for long decodes.

Layout of the work (the shape of vLLM's unified Triton attention, written anew):
a program owns one KV head and a tile of `BLOCK_M` query rows = `BLOCK_Q` new
tokens of one sequence x the `GROUP` query heads sharing that KV head (GQA), so
each K/V tile read from the cache serves the whole group. It walks the keys
`BLOCK_N` at a time through the block table, with an online softmax in fp32
(exp2 domain). Queries of a sequence sit at the end of its context, so causal
masking, chunked prefill (cached prefix + new tokens) and decode are one rule;
a sliding window only shrinks the key range walked.

Decode batches have few query tiles, so the key range is also split over
`num_splits` programs (flash-decoding); each writes an unnormalised partial
(max, sum, acc) and a second kernel merges them and adds the sink.

Attention sinks are one extra logit per query head that takes probability mass
but adds no value: the running max and sum simply start from it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """Sequence owning query tile `tile`: the last i with query_start_loc[i] // BLOCK_Q + i <= tile."""
    lo = tile * 0  # a tensor from the start: loop-carried values keep one type when compiled
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go_right = first_tile <= tile
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, sinks_ptr,
    num_seqs, scale_log2, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    num_heads, head_dim,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len

        rows = tl.arange(0, BLOCK_M)
        q_local = q_tile * BLOCK_Q + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (q_local < q_len)
        q_pos = context + q_local
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        token = (q_start + q_local).to(tl.int64)
        q = tl.load(
            q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)

        # Keys this tile can see, then this split's share of them.
        first_pos = context + q_tile * BLOCK_Q
        last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
        kv_lo = 0
        if HAS_WINDOW:
            kv_lo = tl.maximum(first_pos - window + 1, 0)
        first_block = kv_lo // BLOCK_N
        num_blocks = tl.cdiv(last_pos + 1, BLOCK_N) - first_block
        per_split = tl.cdiv(num_blocks, NUM_SPLITS)
        block_begin = first_block + split * per_split
        block_end = tl.minimum(block_begin + per_split, first_block + num_blocks)

        if HAS_SINKS and NUM_SPLITS == 1:
            m_i = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        n = tl.arange(0, BLOCK_N)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for blk in range(block_begin, block_end):
            k_pos = blk * BLOCK_N + n
            k_ok = k_pos < seq_len
            page = tl.load(table + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
            offs = page[:, None] * stride_cb + (k_pos % PAGE)[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            # Only tiles crossing the causal diagonal, the window's edge or the context's end
            # need a mask: every key of an interior tile is visible to every query of this tile.
            interior = blk * BLOCK_N + BLOCK_N - 1 <= first_pos
            if HAS_WINDOW:
                interior = interior & (blk * BLOCK_N > last_pos - window)
            if not interior:
                allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
                if HAS_WINDOW:
                    allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(
                out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty), mask=out_mask,
            )
        else:
            part = (token * num_heads + head) * NUM_SPLITS + split
            tl.store(part_acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=out_mask)
            tl.store(part_max_ptr + part, m_i, mask=row_ok)
            tl.store(part_sum_ptr + part, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr, out_ptr,
    stride_ot, stride_oh, num_heads, head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (token * num_heads + head) * NUM_SPLITS
    s = tl.arange(0, NUM_SPLITS)
    m = tl.load(part_max_ptr + base + s)
    l = tl.load(part_sum_ptr + base + s)
    m_all = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_safe)
    total = tl.sum(l * w, axis=0)
    if HAS_SINKS:
        total += tl.exp2(sink - m_safe)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * head_dim + d[None, :], mask=d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 dots (Triton would use TF32); 16-bit ones use the tensor cores as is."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(num_programs: int, device: torch.device) -> int:
    """Enough programs to fill the GPU: a power of two, > 1 only when query tiles x KV heads are few."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while num_programs * splits < 2 * sms and splits < 32:
        splits *= 2
    return splits


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
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.reference.paged_attention`; `num_splits` overrides the split-K choice."""
    tokens, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    if k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if query_start_loc.shape != (seq_lens.shape[0] + 1,) or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("paged_attention: seq_lens, query_start_loc and block_tables disagree on the sequence count")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_attention needs K and V caches of one contiguous layout")
    if q.stride(-1) != 1:
        q = q.contiguous()
    # One integer width for the in-kernel search (no-ops for the engine's int32 metadata).
    seq_lens, query_start_loc = seq_lens.to(torch.int32), query_start_loc.to(torch.int32)
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    decode_only = tokens <= num_seqs
    # Prefill: 128 query rows (16 tokens x 8 heads for gpt-oss) share each K/V tile read, twice
    # the reuse of 64; at 8 warps it compiles without spills (sm_90 figures in docs/kernels.md).
    # Decode: one MMA tile of 16 rows.
    block_m = max(16, triton.next_power_of_2(group)) if decode_only else max(128, triton.next_power_of_2(group))
    num_warps = 4 if decode_only else 8
    block_q = block_m // group
    num_tiles = tokens // block_q + num_seqs  # upper bound on sum_i ceil(q_len_i / block_q)
    block_n = 64 if head_dim <= 64 else 32
    if q.device.type != "cuda":
        block_n = 16
    if num_splits is None:
        # The block table's width bounds every context: no split gets less than one key tile.
        max_key_tiles = triton.cdiv(block_tables.shape[1] * page, block_n)
        largest = 1 << (max(max_key_tiles, 1).bit_length() - 1)  # power of two <= max_key_tiles
        num_splits = min(_num_splits(num_tiles * num_kv_heads, q.device), largest)
        num_splits = num_splits if decode_only else 1
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    window = sliding_window or 0
    if num_splits > 1:
        part_acc = torch.empty((tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty((tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out
    sinks_arg = sinks if sinks is not None else out
    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, seq_lens, query_start_loc, sinks_arg,
        num_seqs, scale * _LOG2E, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_heads, head_dim,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PAGE=page,
        NUM_SPLITS=num_splits, HAS_WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None,
        UPCAST=q.device.type != "cuda", PRECISION=_precision(q.dtype), num_warps=num_warps,
    )
    if num_splits > 1:
        _merge_splits_kernel[(tokens, num_heads)](
            part_acc, part_max, part_sum, sinks_arg, out,
            out.stride(0), out.stride(1), num_heads, head_dim,
            NUM_SPLITS=num_splits, BLOCK_D=block_d, HAS_SINKS=sinks is not None,
        )
    return out
