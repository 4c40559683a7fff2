"""MXFP4 x bf16 matmul: packed E2M1 weights with E8M0 scales per 32, dequantized in registers.

`y[m, n] = sum_k a[m, k] * w[e, n, k] (+ bias[e, n])` with fp32 accumulation. One
kernel serves the dense linear (one "expert", rows in order) and the grouped MoE
(every expert of a layer in one launch over rows sorted by expert): a row tile
learns its expert and row range from a small schedule, may gather its input rows
(token of each (token, expert) pair), may fuse gpt-oss's SwiGLU or the routing
weight into the epilogue, and may scatter its output rows or add them atomically
into an fp32 output (the MoE's top-k combine; this also allows split-K on small
grids; without atomics, split-K stores fp32 partials that one more launch sums in
order). Weights are read once per row tile, so decode-sized M (one tile) stays
bandwidth-bound; the weight bytes are never expanded to a bf16 copy in memory.

MXFP4 weights come in the layout `kernels.mxfp4.swizzle` makes once at load (a weight
tile of one K block is one contiguous read, each MMA thread's bytes side by side);
dense (unquantized) expert weights go through the same kernel with `MXFP4=False`.
Hopper has no FP4 tensor cores, so the dot runs in the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.mxfp4 import TILE_K
from kernels.triton.activation import swiglu_oss_math


@triton.jit
def _e2m1_to_f32_div_2_14(code):
    """4-bit E2M1 codes to fp32, times 2^-14, in five integer ops.

    Sign to bit 15 and (exponent, mantissa) to bits 11..9 make the fp16 number
    2^-14 * value: code 0b001 (0.5) lands on an fp16 subnormal, which the fp16 ->
    fp32 conversion makes exact, so no select or fix-up is needed. The 2^14 is
    folded into the block scale.
    """
    code = code.to(tl.uint16)
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e8m0_to_f32_times_2_14(scale):
    """E8M0 byte s to 2^(s-127) * 2^14, built as fp32 exponent field s + 14.

    Exact for s <= 240; block scales above 2^113 overflow (never seen in weights).
    """
    bits = (scale.to(tl.int32) + 14) << 23
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_block(
    acc, a_base, row_ok, w_tile, s_tile, k0,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, DOT_FORMAT: tl.constexpr,
    BLOCK_N: tl.constexpr, WIDTH: tl.constexpr,
):
    """acc += a[:, k0:k0+WIDTH] @ w[cols, k0:k0+WIDTH].T for one swizzled K block of the weight.

    `w_tile` / `s_tile` point at the tile's rows (`[BLOCK_N, WIDTH/2]` bytes, `[BLOCK_N, WIDTH/32]`
    scales, rows contiguous: a masked row reads nothing). The bytes of a row are stored
    thread-major (`kernels.mxfp4.SwizzledMXFP4`); the reshape + permute below restores K order
    in registers, which is the operand layout the tensor cores want, so it costs no data movement.
    """
    packed = tl.load(w_tile + tl.arange(0, WIDTH // 2)[None, :])
    packed = tl.reshape(tl.permute(tl.reshape(packed, (BLOCK_N, 4, WIDTH // 8)), (0, 2, 1)), (BLOCK_N, WIDTH // 2))
    scale = tl.load(s_tile + tl.arange(0, WIDTH // 32)[None, :])
    if DOT_FORMAT != "":
        # 16-bit activations: Triton's scaled dot upcasts the E2M1 codes and E8M0 scales in
        # registers with its own conversion sequences and feeds the tensor cores.
        a = tl.load(a_base + k0 + tl.arange(0, WIDTH)[None, :], mask=row_ok[:, None], other=0.0)
        acc = tl.dot_scaled(a, None, DOT_FORMAT, tl.trans(packed), scale, "e2m1", acc=acc)
    else:
        # fp32 activations (no scaled-dot format): decode by hand. Byte j of a row holds elements
        # 2j (low nibble) and 2j+1 (high): two dots, one over the even elements and one over the
        # odd, so the nibbles never need interleaving.
        scale = _e8m0_to_f32_times_2_14(scale)[:, :, None]
        lo = tl.reshape(_e2m1_to_f32_div_2_14(packed & 0xF), (BLOCK_N, WIDTH // 32, 16)) * scale
        hi = tl.reshape(_e2m1_to_f32_div_2_14(packed >> 4), (BLOCK_N, WIDTH // 32, 16)) * scale
        lo = tl.reshape(lo, (BLOCK_N, WIDTH // 2))
        hi = tl.reshape(hi, (BLOCK_N, WIDTH // 2))
        even = k0 + 2 * tl.arange(0, WIDTH // 2)
        a_even = tl.load(a_base + even[None, :], mask=row_ok[:, None], other=0.0)
        a_odd = tl.load(a_base + even[None, :] + 1, mask=row_ok[:, None], other=0.0)
        if UPCAST:
            acc += tl.dot(a_even.to(tl.float32), tl.trans(lo), input_precision=PRECISION)
            acc += tl.dot(a_odd.to(tl.float32), tl.trans(hi), input_precision=PRECISION)
        else:
            acc += tl.dot(a_even, tl.trans(lo.to(a_even.dtype)), input_precision=PRECISION)
            acc += tl.dot(a_odd, tl.trans(hi.to(a_odd.dtype)), input_precision=PRECISION)
    return acc


@triton.jit
def _matmul_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    a_rows_ptr, out_rows_ptr, route_w_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
    M, N, K, num_experts, a_rows_div, out_rows_div,
    stride_am, stride_we, stride_wn, stride_se, stride_be, stride_om,
    MXFP4: tl.constexpr, SCHEDULED: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr,
    ROUTE_WEIGHT: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC_ADD: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FORMAT: tl.constexpr,
    alpha, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    if SCHEDULED:
        expert = tl.load(tile_expert_ptr + pid_m)
        row_start = tl.load(tile_start_ptr + pid_m)
        row_end = tl.load(expert_end_ptr + tl.minimum(expert, num_experts - 1))
    else:
        expert = pid_m * 0
        row_start = pid_m * BLOCK_M
        row_end = M
    if expert < num_experts:  # tiles past the schedule's end have nothing to do
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        a_rows = rows
        if GATHER_A:  # e.g. the token of each (token, slot) pair: pair // top_k
            a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0) // a_rows_div
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        expert64 = expert.to(tl.int64)
        a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # Split-K: this program's share of the K blocks (its partial sum is added atomically).
        blocks_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        first_block = split * blocks_per_split
        if MXFP4:
            # Swizzled layout (kernels.mxfp4.SwizzledMXFP4): K block b holds rows [N, BLOCK_K/2] bytes
            # at b * N * BLOCK_K/2; column tiles past N clamp to the last row (their results are masked).
            tile_rows = tl.minimum(cols, N - 1).to(tl.int64)[:, None]
            w_base = w_ptr + expert64 * stride_we + tile_rows * (BLOCK_K // 2)
            s_base = s_ptr + expert64 * stride_se + tile_rows * (BLOCK_K // 32)
            full_blocks = K // BLOCK_K
            for b in range(first_block, tl.minimum(first_block + blocks_per_split, full_blocks)):
                acc = _mxfp4_block(
                    acc, a_base, row_ok, w_base + b * (BLOCK_K // 2) * N, s_base + b * (BLOCK_K // 32) * N,
                    b * BLOCK_K, UPCAST, PRECISION, DOT_FORMAT, BLOCK_N, BLOCK_K,
                )
            # K's remainder (32, 64 or 96): a block of 64 and/or one of 32 after the full ones, last split only.
            k0 = full_blocks * BLOCK_K
            for i in tl.static_range(1, 3):
                if (K - k0 >= BLOCK_K >> i) & (split == SPLIT_K - 1):
                    acc = _mxfp4_block(
                        acc, a_base, row_ok,
                        w_ptr + expert64 * stride_we + k0 // 2 * N + tile_rows * ((BLOCK_K >> i) // 2),
                        s_ptr + expert64 * stride_se + k0 // 32 * N + tile_rows * ((BLOCK_K >> i) // 32),
                        k0, UPCAST, PRECISION, DOT_FORMAT, BLOCK_N, BLOCK_K >> i,
                    )
                    k0 += BLOCK_K >> i
        else:
            w_base = w_ptr + expert64 * stride_we + cols.to(tl.int64)[:, None] * stride_wn
            for k0 in range(first_block * BLOCK_K, tl.minimum((first_block + blocks_per_split) * BLOCK_K, K), BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_base + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
                w = tl.load(w_base + k[None, :], mask=col_ok[:, None] & (k[None, :] < K), other=0.0)
                if UPCAST:
                    acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
                else:
                    acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert64 * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += (bias * (split == 0).to(tl.float32))[None, :]  # one split adds the bias
        if SPLIT_K == 1:
            # Round to the activation dtype as a separate linear would, before any epilogue
            # (a split-K partial cannot be rounded: those sums stay fp32).
            acc = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
        out_rows = rows
        if SCATTER_OUT:  # e.g. rows back to pair order, or to their token (pair // top_k)
            out_rows = tl.load(out_rows_ptr + rows, mask=row_ok, other=0) // out_rows_div
        if (SPLIT_K > 1) & (not ATOMIC_ADD):  # fp32 partials, row r's splits side by side: summed in order later
            out_rows = out_rows * SPLIT_K + split
        out_base = out_ptr + out_rows.to(tl.int64)[:, None] * stride_om
        if SWIGLU:  # interleaved gate/up columns -> half as many outputs
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
            y = swiglu_oss_math(gate, up, alpha, limit)
            out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            mask = row_ok[:, None] & (out_cols[None, :] < N // 2)
            tl.store(out_base + out_cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if ROUTE_WEIGHT:
                acc = acc * tl.load(route_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            mask = row_ok[:, None] & col_ok[None, :]
            if ATOMIC_ADD:  # fp32 accumulation: the k experts of a token (and split-K partials) meet here
                tl.atomic_add(out_base + cols[None, :], acc, mask=mask, sem="relaxed")
            else:
                tl.store(out_base + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_row_groups_kernel(y_ptr, out_ptr, n, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """out[r] = sum over g of y[r * GROUP + g], in order (fp32), rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    acc = tl.zeros([BLOCK], tl.float32)
    for g in tl.static_range(GROUP):
        acc += tl.load(y_ptr + (row * GROUP + g) * n + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_row_groups(y: torch.Tensor, out: torch.Tensor, group: int) -> None:
    """`out[r] = sum(y[r * group : (r + 1) * group])` in a fixed order: a token's k expert rows, or split-K partials."""
    rows, n = out.shape
    block = min(1024, triton.next_power_of_2(n))
    _sum_row_groups_kernel[(rows, triton.cdiv(n, block))](y, out, n, GROUP=group, BLOCK=block)


# Activation dtypes tl.dot_scaled takes; others (fp32) use the hand-written decode.
_DOT_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Tiles:
    """Rows x columns of an output tile (K is walked `kernels.mxfp4.TILE_K` at a time: the swizzled layout's block)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Hopper tiles per shape class (rows per expert tile), chosen once here rather than autotuned
# while serving; K is walked 128 at a time (the swizzled weight's block). Wide column tiles let
# fewer column tiles re-read the activation tile; small grids are filled by split-K (MoE down:
# atomically; a plain linear: fp32 partials summed by one more launch), not by narrower tiles.
# Every entry compiles for sm_90 without spills (registers, shared memory: docs/kernels.md,
# tests/test_kernels_compile.py): decode at 8 warps needs 80 registers/thread, so three CTAs
# share an SM and four stages keep ~40 KiB of weights in flight per CTA.
HOPPER_TILES = {
    "decode": Tiles(16, 128, 8, 4),  # <= 16 rows per expert: weight-stream bound
    "small": Tiles(64, 256, 8, 3),  # <= 64 rows (batch-256 decode lands here): half the activation re-reads
    "large": Tiles(128, 128, 8, 3),  # prefill: tall row tiles read each weight tile fewer times
}


def shape_class(m_rows: int) -> str:
    return "decode" if m_rows <= 16 else "small" if m_rows <= 64 else "large"


def tiles(m_rows: int, device: torch.device) -> Tiles:
    """The table's tiles on CUDA; small tiles for the CPU interpreter (speed, not performance)."""
    if device.type != "cuda":
        return Tiles(16, 32, 4, 1)
    return HOPPER_TILES[shape_class(m_rows)]


def grid_tiles(m_rows: int, n: int, device: torch.device) -> int:
    """Output tiles of a plain (unscheduled) `[m_rows, n]` product."""
    t = tiles(m_rows, device)
    return int(triton.cdiv(m_rows, t.block_m) * triton.cdiv(n, t.block_n))


def split_k(grid: int, k: int, device: torch.device) -> int:
    """K splits that bring a small grid to about two programs per SM, each keeping >= 4 K blocks."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(2 * sms // max(grid, 1), int(triton.cdiv(k, TILE_K)) // 4))


def launch(
    a: torch.Tensor,
    weight_parts: tuple[torch.Tensor, torch.Tensor | None],
    bias: torch.Tensor | None,
    out: torch.Tensor,
    n: int,
    k: int,
    num_experts: int,
    *,
    schedule: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    a_rows: tuple[torch.Tensor, int] | None = None,
    out_rows: tuple[torch.Tensor, int] | None = None,
    route_weights: torch.Tensor | None = None,
    swiglu: tuple[float, float] | None = None,
    atomic_add: bool = False,
    num_splits: int | None = None,
    rows_per_tile: int | None = None,
    block_m: int | None = None,
) -> None:
    """Run the matmul kernel.

    `weight_parts` is (swizzled blocks `[E, N*K/2]` uint8, scales `[E, N*K/32]`; see
    `kernels.mxfp4.SwizzledMXFP4`) or (dense `[E, N, K]`, None). `schedule` = (tile_expert, tile_start, expert_end) for
    grouped rows; without it rows 0..M-1 use expert 0. `a_rows` / `out_rows` are
    (index tensor, divisor): row r reads `a[index[r] // divisor]` / writes
    `out[index[r] // divisor]`. `atomic_add` adds fp32 results into a zeroed `out`
    instead of storing, which also allows split-K (`num_splits`, default: by grid size).
    Without it, `num_splits` > 1 stores fp32 partials: output row r, split s goes to
    `out[r * num_splits + s]` (sum them with `sum_row_groups`).
    """
    w, scales = weight_parts
    mxfp4 = scales is not None
    t = tiles(rows_per_tile or a.shape[0], a.device)
    bm, bn = block_m or t.block_m, t.block_n
    num_m_tiles = schedule[0].shape[0] if schedule is not None else triton.cdiv(a.shape[0], bm)
    if num_m_tiles == 0 or n == 0:
        return
    splits = num_splits or (split_k(num_m_tiles * triton.cdiv(n, bn), k, a.device) if atomic_add else 1)
    if splits > 1 and swiglu is not None:
        raise ValueError("split-K cannot feed the SwiGLU epilogue: it needs whole sums")
    dummy = out
    tile_expert, tile_start, expert_end = schedule if schedule is not None else (dummy, dummy, dummy)
    a_index, a_div = a_rows if a_rows is not None else (dummy, 1)
    out_index, out_div = out_rows if out_rows is not None else (dummy, 1)
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    s = scales if scales is not None else w
    stride_wn = 0 if mxfp4 else w.stride(1)  # the swizzled layout's row stride is fixed by BLOCK_K
    _matmul_kernel[(num_m_tiles, triton.cdiv(n, bn), splits)](
        a, w, s, bias if bias is not None else dummy, out,
        a_index, out_index, route_weights if route_weights is not None else dummy, tile_expert, tile_start, expert_end,
        a.shape[0], n, k, num_experts, a_div, out_div,
        a.stride(0), w.stride(0), stride_wn, s.stride(0),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        MXFP4=mxfp4, SCHEDULED=schedule is not None, GATHER_A=a_rows is not None,
        SCATTER_OUT=out_rows is not None, ROUTE_WEIGHT=route_weights is not None,
        SWIGLU=swiglu is not None, HAS_BIAS=bias is not None, UPCAST=a.device.type != "cuda",
        ATOMIC_ADD=atomic_add, SPLIT_K=splits,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", DOT_FORMAT=_DOT_FORMATS.get(a.dtype, ""),
        alpha=float(alpha), limit=float(limit),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=TILE_K, num_warps=t.num_warps, num_stages=t.num_stages,
    )
