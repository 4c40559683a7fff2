"""Kernel benchmarks at gpt-oss-20b and Llama-3-8B shapes, against the device's own limits and torch.

Each case is timed with `triton.testing.do_bench` (median ms) and reports achieved
GB/s (bytes that must move: packed weights, KV read, activations) and TFLOP/s, as
fractions of this device's measured copy bandwidth and bf16 matmul rate (measured
in the same run), and the speedup over a torch baseline:
- MXFP4 linear: dequantize-then-`F.linear` (and bf16 `F.linear` on pre-dequantized weights);
- MXFP4 MoE: `kernels.reference.moe_experts` on the same experts dequantized to bf16;
- paged attention: K/V gathered through the block table, then `F.scaled_dot_product_attention`;
- norm/rope/activations/KV write: `kernels.reference`.

It first prints how many device dispatches one gpt-oss decode layer issues
(`bench/launches.py`: kernels stubbed, aten ops counted; the budget is 12).

    python -m bench.kernels [--only mxfp4,moe,attention,elementwise] [--json out.json]
    TRITON_INTERPRET=1 python -m bench.kernels --smoke   # tiny shapes on CPU: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench import launches
from kernels import mxfp4, reference, routing
from kernels.ops import Ops


@dataclass(frozen=True)
class Shapes:
    """The dimensions a benchmark needs from one model."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int = 0
    top_k: int = 0


GPT_OSS_20B = Shapes("gpt-oss-20b", 2880, 64, 8, 64, 2880, experts=32, top_k=4)
LLAMA3_8B = Shapes("Llama-3-8B", 4096, 32, 8, 128, 14336)
TINY = Shapes("tiny", 64, 4, 2, 32, 64, experts=4, top_k=2)

DECODE_BATCHES = (1, 8, 64, 256)
PREFILL_TOKENS = 2048


@dataclass
class Result:
    kernel: str
    model: str
    case: str
    tokens: int
    ms: float
    gbytes: float
    gflops: float
    baseline: str
    baseline_ms: float | None
    gb_per_s: float = 0.0
    tflop_per_s: float = 0.0
    bw_fraction: float = 0.0
    flop_fraction: float = 0.0
    speedup: float | None = None


class Bench:
    """Timing and device ceilings; on CPU (smoke runs) a wall-clock timer replaces do_bench."""

    def __init__(self, device: str, smoke: bool) -> None:
        self.device = device
        self.smoke = smoke
        self.copy_gb_per_s = 0.0
        self.bf16_tflop_per_s = 0.0
        self.results: list[Result] = []

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def measure_device(self) -> None:
        """Copy bandwidth (read + write bytes) and dense bf16 matmul rate of this device."""
        n = (1 << 28) if not self.smoke else (1 << 16)  # 512 MiB of bf16
        src = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        self.copy_gb_per_s = 2 * src.numel() * 2 / self.time_ms(lambda: dst.copy_(src)) / 1e6
        size = 8192 if not self.smoke else 128
        a = torch.randn(size, size, dtype=torch.bfloat16, device=self.device)
        b = torch.randn(size, size, dtype=torch.bfloat16, device=self.device)
        self.bf16_tflop_per_s = 2 * size**3 / self.time_ms(lambda: a @ b) / 1e9
        del src, dst, a, b

    def record(self, kernel: str, model: str, case: str, tokens: int, fn: Callable[[], object], nbytes: float,
               flops: float, baseline: str = "", baseline_fn: Callable[[], object] | None = None) -> Result:
        ms = self.time_ms(fn)
        base_ms = self.time_ms(baseline_fn) if baseline_fn is not None else None
        r = Result(kernel, model, case, tokens, ms, nbytes / 1e9, flops / 1e9, baseline, base_ms)
        r.gb_per_s = nbytes / ms / 1e6
        r.tflop_per_s = flops / ms / 1e9
        r.bw_fraction = r.gb_per_s / self.copy_gb_per_s if self.copy_gb_per_s else 0.0
        r.flop_fraction = r.tflop_per_s / self.bf16_tflop_per_s if self.bf16_tflop_per_s else 0.0
        r.speedup = base_ms / ms if base_ms else None
        self.results.append(r)
        print(format_row(r), flush=True)
        return r


def random_mxfp4(shape: tuple[int, ...], device: str) -> mxfp4.MXFP4Tensor:
    """Random packed codes with scales near 2^-5: real-shaped weights without quantizing a float copy."""
    *lead, out_features, in_features = shape
    blocks = torch.randint(0, 256, (*lead, out_features, in_features // 32, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(120, 124, (*lead, out_features, in_features // 32), dtype=torch.uint8, device=device)
    return mxfp4.MXFP4Tensor(blocks, scales)


def _ops() -> Ops:
    from kernels import triton_ops

    return triton_ops


def _batches(b: Bench) -> tuple[int, ...]:
    return (1, 3) if b.smoke else (*DECODE_BATCHES, PREFILL_TOKENS)


def bench_mxfp4_linear(b: Bench, models: list[Shapes]) -> None:
    ops = _ops()
    for m in models:
        projections = {
            "qkv": ((m.heads + 2 * m.kv_heads) * m.head_dim, m.hidden),
            "gate_up": (2 * m.intermediate, m.hidden),
            "down": (m.hidden, m.intermediate),
        }
        for name, (n, k) in projections.items():
            weight = random_mxfp4((n, k), b.device)
            dense = weight.dequantize(torch.bfloat16)
            wbytes = weight.blocks.numel() + weight.scales.numel()
            swizzled = ops.prepare_weight(weight)
            for tokens in _batches(b):
                x = torch.randn(tokens, k, device=b.device, dtype=torch.bfloat16)
                b.record(
                    "mxfp4_linear", m.name, f"{name} {n}x{k}", tokens,
                    lambda: ops.linear(x, swizzled), wbytes + 2 * tokens * (n + k), 2 * tokens * n * k,
                    "dequant+F.linear", lambda: F.linear(x, weight.dequantize(torch.bfloat16)),
                )
                b.record(
                    "bf16_linear(F.linear)", m.name, f"{name} {n}x{k}", tokens,
                    lambda: F.linear(x, dense), 2 * n * k + 2 * tokens * (n + k), 2 * tokens * n * k,
                )
            del weight, dense, swizzled


def bench_moe(b: Bench, models: list[Shapes]) -> None:
    from kernels.triton import routing as triton_routing

    ops = _ops()
    for m in models:
        if not m.experts:
            continue
        w_gate_up = random_mxfp4((m.experts, 2 * m.intermediate, m.hidden), b.device)
        w_down = random_mxfp4((m.experts, m.hidden, m.intermediate), b.device)
        b_gate_up = torch.randn(m.experts, 2 * m.intermediate, device=b.device, dtype=torch.bfloat16)
        b_down = torch.randn(m.experts, m.hidden, device=b.device, dtype=torch.bfloat16)
        dense_gate_up, dense_down = w_gate_up.dequantize(torch.bfloat16), w_down.dequantize(torch.bfloat16)
        per_expert = sum(t.numel() for t in (w_gate_up.blocks, w_gate_up.scales, w_down.blocks, w_down.scales))
        per_expert //= m.experts
        swizzled_gate_up, swizzled_down = ops.prepare_weight(w_gate_up), ops.prepare_weight(w_down)
        for tokens in _batches(b):
            x = torch.randn(tokens, m.hidden, device=b.device, dtype=torch.bfloat16)
            logits = torch.randn(tokens, m.experts, device=b.device)
            touched = int(reference.moe_route(logits, m.top_k)[1].unique().numel())
            flops = 2 * tokens * m.top_k * 3 * m.hidden * m.intermediate
            nbytes = touched * per_expert + 2 * tokens * m.hidden * 2
            b.record(
                "mxfp4_moe", m.name, f"E{m.experts} top{m.top_k} ({touched} experts hit)", tokens,
                lambda: ops.moe(x, logits, m.top_k, swizzled_gate_up, b_gate_up, swizzled_down, b_down), nbytes, flops,
                "torch bf16 experts",
                lambda: reference.moe(x, logits, m.top_k, dense_gate_up, b_gate_up, dense_down, b_down),
            )
            b.record(
                "moe_routing", m.name, f"E{m.experts} top{m.top_k}", tokens,
                lambda: triton_routing.route(m.top_k, m.experts, 16, router_logits=logits),
                logits.numel() * 4 + tokens * m.top_k * 16, 0,
                "torch top-k + sort + schedule",
                lambda: _torch_route(logits, m.top_k, m.experts),
            )
        del w_gate_up, w_down, dense_gate_up, dense_down, swizzled_gate_up, swizzled_down


def _torch_route(logits: torch.Tensor, top_k: int, num_experts: int) -> routing.Routing:
    """The baseline: torch's top-k, then the routing layout."""
    weights, expert_ids = reference.moe_route(logits, top_k)
    return routing.route(expert_ids, weights, num_experts, 16)


def _paged_kv(b: Bench, m: Shapes, batch: int, context: int,
              block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, m.kv_heads, m.head_dim)
    k_cache = torch.randn(shape, device=b.device, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=b.device, dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device=b.device, dtype=torch.int32).view(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def _sdpa_on_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                      context: int, q_len: int, causal: bool) -> torch.Tensor:
    """Baseline: gather each sequence's K/V through its block table, then torch SDPA with GQA."""
    batch, kv_heads, head_dim = tables.shape[0], k_cache.shape[2], k_cache.shape[3]
    k = k_cache[tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :context].transpose(1, 2)
    v = v_cache[tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :context].transpose(1, 2)
    qb = q.view(batch, q_len, -1, head_dim).transpose(1, 2)
    return F.scaled_dot_product_attention(qb, k, v, is_causal=causal, enable_gqa=True)


def bench_attention(b: Bench, models: list[Shapes]) -> None:
    ops = _ops()
    for m in models:
        scale = m.head_dim**-0.5
        sinks = torch.randn(m.heads, device=b.device) if m.experts else None
        for batch in (1, 3) if b.smoke else DECODE_BATCHES:
            context = 64 if b.smoke else (4096 if batch <= 64 else 2048)
            k_cache, v_cache, tables = _paged_kv(b, m, batch, context)
            q = torch.randn(batch, m.heads, m.head_dim, device=b.device, dtype=torch.bfloat16)
            lens = torch.full((batch,), context, device=b.device, dtype=torch.int32)
            starts = torch.arange(batch + 1, device=b.device, dtype=torch.int32)
            kv_bytes = 2 * batch * context * m.kv_heads * m.head_dim * 2
            b.record(
                "paged_attention decode", m.name, f"ctx {context}" + (" +sinks" if sinks is not None else ""), batch,
                lambda: ops.paged_attention(q, k_cache, v_cache, tables, lens, starts, scale, None, sinks),
                kv_bytes + 4 * q.numel(), 4 * batch * context * m.heads * m.head_dim,
                "gather+SDPA", lambda: _sdpa_on_gathered(q, k_cache, v_cache, tables, context, 1, False),
            )
            del k_cache, v_cache
        tokens = 32 if b.smoke else PREFILL_TOKENS
        k_cache, v_cache, tables = _paged_kv(b, m, 1, tokens)
        q = torch.randn(tokens, m.heads, m.head_dim, device=b.device, dtype=torch.bfloat16)
        lens = torch.tensor([tokens], device=b.device, dtype=torch.int32)
        starts = torch.tensor([0, tokens], device=b.device, dtype=torch.int32)
        for window in (None, 128) if m.experts else (None,):
            seen = tokens * (tokens + 1) / 2 if window is None else tokens * min(window, tokens)
            b.record(
                "paged_attention prefill", m.name, "causal" if window is None else f"window {window}", tokens,
                lambda: ops.paged_attention(q, k_cache, v_cache, tables, lens, starts, scale, window, sinks),
                2 * 2 * tokens * m.kv_heads * m.head_dim * 2 + 4 * q.numel(), 4 * seen * m.heads * m.head_dim,
                "gather+SDPA(full causal)" if window is None else "",
                (lambda: _sdpa_on_gathered(q, k_cache, v_cache, tables, tokens, tokens, True)) if window is None else None,
            )


def bench_elementwise(b: Bench, models: list[Shapes]) -> None:
    ops = _ops()
    for m in models:
        for tokens in _batches(b):
            x = torch.randn(tokens, m.hidden, device=b.device, dtype=torch.bfloat16)
            res = torch.randn_like(x)
            w = torch.randn(m.hidden, device=b.device, dtype=torch.bfloat16)
            b.record(
                "rms_norm+residual", m.name, f"hidden {m.hidden}", tokens,
                lambda: ops.rms_norm(x, w, 1e-5, res), 4 * x.numel() * 2, 0,
                "torch", lambda: reference.rms_norm(x, w, 1e-5, res),
            )
            q = torch.randn(tokens, m.heads, m.head_dim, device=b.device, dtype=torch.bfloat16)
            k = torch.randn(tokens, m.kv_heads, m.head_dim, device=b.device, dtype=torch.bfloat16)
            pos = torch.arange(tokens, device=b.device)
            inv_freq = 1.0 / (150000.0 ** (torch.arange(0, m.head_dim, 2, device=b.device).float() / m.head_dim))
            b.record(
                "rope", m.name, f"{m.heads}+{m.kv_heads} heads x {m.head_dim}", tokens,
                lambda: ops.rope(q, k, pos, inv_freq, 1.2), 2 * 2 * (q.numel() + k.numel()), 0,
                "torch", lambda: reference.rope(q, k, pos, inv_freq, 1.2),
            )
            gate_up = torch.randn(tokens, 2 * m.intermediate, device=b.device, dtype=torch.bfloat16)
            act = (ops.swiglu_oss, reference.swiglu_oss) if m.experts else (ops.silu_and_mul, reference.silu_and_mul)
            b.record(
                act[0].__name__, m.name, f"2x{m.intermediate}", tokens,
                lambda: act[0](gate_up), 3 * gate_up.numel(), 0, "torch", lambda: act[1](gate_up),
            )
            k_cache, v_cache, _ = _paged_kv(b, m, 1, max(tokens, 16) * 2)
            slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1], device=b.device)[:tokens]
            b.record(
                "write_kv_cache", m.name, f"{m.kv_heads}x{m.head_dim}", tokens,
                lambda: ops.write_kv_cache(k, k, k_cache, v_cache, slots), 2 * 2 * 2 * k.numel(), 0,
                "torch", lambda: reference.write_kv_cache(k, k, k_cache, v_cache, slots),
            )


SUITES = {
    "mxfp4": bench_mxfp4_linear,
    "moe": bench_moe,
    "attention": bench_attention,
    "elementwise": bench_elementwise,
}


def format_row(r: Result) -> str:
    speed = f"{r.speedup:5.2f}x vs {r.baseline}" if r.speedup else ""
    return (
        f"{r.kernel:24s} {r.model:12s} {r.case:34s} T={r.tokens:<5d} {r.ms * 1e3:9.1f} us "
        f"{r.gb_per_s:8.1f} GB/s ({r.bw_fraction:4.0%}) {r.tflop_per_s:7.2f} TFLOP/s ({r.flop_fraction:4.0%}) {speed}"
    )


def run(only: list[str] | None = None, smoke: bool = False, device: str | None = None) -> dict[str, Any]:
    """Run the chosen suites; each failure is recorded and the others still run."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    b = Bench(device, smoke)
    torch.manual_seed(0)
    b.measure_device()
    print(f"device {device}: copy {b.copy_gb_per_s:.0f} GB/s, bf16 matmul {b.bf16_tflop_per_s:.1f} TFLOP/s", flush=True)
    layer_dispatches = launches.gpt_oss_decode_layer()
    print(launches.summary(layer_dispatches), flush=True)
    models = [TINY] if smoke else [GPT_OSS_20B, LLAMA3_8B]
    errors = {}
    for name in only or list(SUITES):
        try:
            SUITES[name](b, models)
        except Exception as exc:  # one failing suite must not lose the others' numbers
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"suite {name} failed: {errors[name]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
        "copy_gb_per_s": b.copy_gb_per_s,
        "bf16_tflop_per_s": b.bf16_tflop_per_s,
        "decode_layer_dispatches": dict(layer_dispatches),
        "results": [asdict(r) for r in b.results],
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated: " + ",".join(SUITES))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check of the harness)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites {sorted(unknown)}; choose from {', '.join(SUITES)}")
    report = run(only, smoke=args.smoke)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
