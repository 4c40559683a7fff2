"""MXFP4 x bf16 matmul: packed E2M1 weights with E8M0 scales per 32, dequantized in registers.

`y[m, n] = sum_k a[m, k] * w[e, n, k] (+ bias[e, n])` with fp32 accumulation. One
kernel serves the dense linear (one "expert", rows in order) and the grouped MoE
(every expert of a layer in one launch over rows sorted by expert): a row tile
learns its expert and row range from a small schedule, may gather its input rows
(token of each (token, expert) pair), may fuse gpt-oss's SwiGLU or the routing
weight into the epilogue, and may scatter its output rows. Weights are read once
per row tile, so decode-sized M (one tile) stays bandwidth-bound; the weight
bytes are never expanded to a bf16 copy in memory.

Dense (unquantized) expert weights go through the same kernel with `MXFP4=False`.
Hopper has no FP4 tensor cores, so the dot runs in the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _matmul_kernel(
    a_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    a_rows_ptr, out_rows_ptr, route_w_ptr, tile_expert_ptr, tile_start_ptr, expert_end_ptr,
    M, N, K, num_experts,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_om,
    MXFP4: tl.constexpr, SCHEDULED: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr,
    ROUTE_WEIGHT: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FORMAT: tl.constexpr,
    alpha, limit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
        if GATHER_A:
            a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        expert64 = expert.to(tl.int64)
        a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
        w_base = w_ptr + expert64 * stride_we + cols.to(tl.int64)[:, None] * stride_wn
        s_base = s_ptr + expert64 * stride_se + cols.to(tl.int64)[:, None] * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if MXFP4 and DOT_FORMAT != "":
                # 16-bit activations: Triton's scaled dot upcasts the E2M1 codes and E8M0 scales in
                # registers with its own conversion sequences and feeds the tensor cores.
                k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_base + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_base + kb[None, :], mask=col_ok[:, None] & (kb[None, :] < K // 2), other=0)
                ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                scale = tl.load(s_base + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < K // 32), other=0)
                acc = tl.dot_scaled(a, None, DOT_FORMAT, tl.trans(packed), scale, "e2m1", acc=acc)
            elif MXFP4:
                # fp32 activations (no scaled-dot format): decode by hand. Byte j of a row holds elements 2j (low nibble) and 2j+1 (high): two dots, one over
                # the even elements and one over the odd, so the nibbles never need interleaving.
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(w_base + kb[None, :], mask=col_ok[:, None] & (kb[None, :] < K // 2), other=0)
                ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                scale = tl.load(s_base + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < K // 32), other=0)
                scale = _e8m0_to_f32_times_2_14(scale)[:, :, None]
                lo = tl.reshape(_e2m1_to_f32_div_2_14(packed & 0xF), (BLOCK_N, BLOCK_K // 32, 16)) * scale
                hi = tl.reshape(_e2m1_to_f32_div_2_14(packed >> 4), (BLOCK_N, BLOCK_K // 32, 16)) * scale
                lo = tl.reshape(lo, (BLOCK_N, BLOCK_K // 2))
                hi = tl.reshape(hi, (BLOCK_N, BLOCK_K // 2))
                even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                a_mask = row_ok[:, None] & (even[None, :] < K)
                a_even = tl.load(a_base + even[None, :], mask=a_mask, other=0.0)
                a_odd = tl.load(a_base + even[None, :] + 1, mask=a_mask, other=0.0)
                if UPCAST:
                    acc += tl.dot(a_even.to(tl.float32), tl.trans(lo), input_precision=PRECISION)
                    acc += tl.dot(a_odd.to(tl.float32), tl.trans(hi), input_precision=PRECISION)
                else:
                    acc += tl.dot(a_even, tl.trans(lo.to(a_even.dtype)), input_precision=PRECISION)
                    acc += tl.dot(a_odd, tl.trans(hi.to(a_odd.dtype)), input_precision=PRECISION)
            else:
                k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_base + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
                w = tl.load(w_base + k[None, :], mask=col_ok[:, None] & (k[None, :] < K), other=0.0)
                if UPCAST:
                    acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
                else:
                    acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert64 * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # Round to the activation dtype as a separate linear would, before any epilogue.
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        out_rows = rows
        if SCATTER_OUT:
            out_rows = tl.load(out_rows_ptr + rows, mask=row_ok, other=0)
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
            tl.store(out_base + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Activation dtypes tl.dot_scaled takes; others (fp32) use the hand-written decode.
_DOT_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _tiles(m_rows: int, n: int, k: int, device: torch.device) -> tuple[int, int, int]:
    """Tile sizes: small row tiles and narrow column tiles for decode (many programs, one weight pass)."""
    block_k = 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    if device.type != "cuda":
        return 16, 32, block_k
    if m_rows <= 16:
        return 16, 64, 256 if k >= 256 else block_k
    if m_rows <= 64:
        return 64, 64, block_k
    return 128, 128, 64


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
    a_rows: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    route_weights: torch.Tensor | None = None,
    swiglu: tuple[float, float] | None = None,
    rows_per_tile: int | None = None,
    block_m: int | None = None,
) -> None:
    """Run the matmul kernel.

    `weight_parts` is (packed blocks `[E, N, K/2]` uint8, scales `[E, N, K/32]`) or
    (dense `[E, N, K]`, None). `schedule` = (tile_expert, tile_start, expert_end) for
    grouped rows; without it rows 0..M-1 use expert 0.
    """
    w, scales = weight_parts
    mxfp4 = scales is not None
    bm, bn, bk = _tiles(rows_per_tile or a.shape[0], n, k, a.device)
    bm = block_m or bm
    num_m_tiles = schedule[0].shape[0] if schedule is not None else triton.cdiv(a.shape[0], bm)
    if num_m_tiles == 0 or n == 0:
        return
    if a.device.type == "cuda" and bn > 32:
        # Decode shapes give few programs (e.g. one expert's 2880 rows / 64): narrower column
        # tiles put more SMs on the weight stream.
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        if num_m_tiles * triton.cdiv(n, bn) < 2 * sms:
            bn = 32
    dummy = out
    tile_expert, tile_start, expert_end = schedule if schedule is not None else (dummy, dummy, dummy)
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    s = scales if mxfp4 else w
    _matmul_kernel[(num_m_tiles, triton.cdiv(n, bn))](
        a, w, s, bias if bias is not None else dummy, out,
        a_rows if a_rows is not None else dummy, out_rows if out_rows is not None else dummy,
        route_weights if route_weights is not None else dummy, tile_expert, tile_start, expert_end,
        a.shape[0], n, k, num_experts,
        a.stride(0), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        MXFP4=mxfp4, SCHEDULED=schedule is not None, GATHER_A=a_rows is not None,
        SCATTER_OUT=out_rows is not None, ROUTE_WEIGHT=route_weights is not None,
        SWIGLU=swiglu is not None, HAS_BIAS=bias is not None, UPCAST=a.device.type != "cuda",
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", DOT_FORMAT=_DOT_FORMATS.get(a.dtype, ""), alpha=float(alpha), limit=float(limit),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
