"""The CPU paged attention (kernels/cpu/layer_ops.cpp) per KV cache dtype at long context, in one run.

Run: python -m bench.cpu_attention [--context 7900] [--queries 1 8 64] [--threads 1] [--rounds 3]

SmolLM2-135M's attention shape (9 query heads, 3 KV heads of 64, 30 layers, 16-token blocks): each
layer's caches are distinct, so a pass reads the whole context from DRAM as a forward does. For each
query count (1: a decode; more: a prompt chunk at the end of the context) the dtypes run interleaved,
round after round, and each keeps its best pass (a busy machine only slows passes down). Reported:
ms per pass of 30 layers, each dtype's ratio to fp32, and the cache bytes read per pass. Saves
bench/results/cpu-attention.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.result_files import write_result
from bench.serve import environment
from kernels.cpu import extension

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYERS = 9, 3, 64, 16, 30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=7900, help="cached tokens before the new queries")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    native = extension.require()
    torch.set_num_threads(args.threads)
    blocks = -(-(args.context + max(args.queries)) // BLOCK_SIZE)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(LAYERS * blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
    values = torch.randn(LAYERS * blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
    caches = {name: (keys.to(dtype), values.to(dtype)) for name, dtype in DTYPES.items()}
    del keys, values
    tables = [torch.arange(layer * blocks, (layer + 1) * blocks, dtype=torch.int32)[None] for layer in range(LAYERS)]

    def one_pass(name: str, queries: torch.Tensor) -> float:
        k_cache, v_cache = caches[name]
        n = queries.shape[0]
        seq_lens = torch.tensor([args.context + n], dtype=torch.int32)
        starts = torch.tensor([0, n], dtype=torch.int32)
        started = time.perf_counter()
        for table in tables:
            native.paged_attention(queries, k_cache, v_cache, table, seq_lens, starts, HEAD_DIM**-0.5)
        return (time.perf_counter() - started) * 1e3

    best = {n: dict.fromkeys(DTYPES, float("inf")) for n in args.queries}
    for n in args.queries:
        queries = torch.randn(n, HEADS, HEAD_DIM, generator=generator)
        for name in DTYPES:
            one_pass(name, queries)  # warm-up
        for _ in range(args.rounds):
            for name in DTYPES:
                best[n][name] = min(best[n][name], one_pass(name, queries))
        line = ", ".join(f"{name} {best[n][name]:.1f} ms ({best[n]['float32'] / best[n][name]:.2f}x)" for name in DTYPES)
        print(f"{n:3d} queries at {args.context} tokens, {LAYERS} layers: {line}", flush=True)
    cache_mb = {name: round(2 * LAYERS * (args.context + 1) * KV_HEADS * HEAD_DIM * dtype.itemsize / 1e6, 1)
                for name, dtype in DTYPES.items()}
    record = {"benchmark": "cpu_attention", "context": args.context, "threads": args.threads, "rounds": args.rounds,
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                        "layers": LAYERS},
              "best_ms": {str(n): {name: round(ms, 2) for name, ms in row.items()} for n, row in best.items()},
              "speedup_vs_float32": {str(n): {name: round(row["float32"] / ms, 3) for name, ms in row.items()}
                                     for n, row in best.items()},
              "cache_mb_per_pass": cache_mb, "environment": environment()}
    write_result("cpu-attention.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
