"""Batched decode on CPU with each kernel for many rows (kernels/cpu/select.py's `many_rows`), in one run.

Run: python -m bench.cpu_many_rows [--concurrency 16 64] [--tokens 64] [--rounds 2] [--threads 1]

One engine on the default model (SmolLM2-135M Q4_1 GGUF). For each concurrency c, c greedy streams
(~80-token prompts, `--tokens` output tokens each, EOS ignored) run to completion with the plan's
kernel for batches past `native_max_rows` set in turn to `dequant` (a cache-sized chunk of weight rows
dequantized per call, then torch's fp32 GEMM) and, where the CPU has AMX-BF16, `tiles-split` and
`tiles-bf16` (qgemm_tiles.cpp); the order alternates by round and the median round counts. Reported:
output tok/s per kernel and its ratio to `dequant`. Saves bench/results/cpu-many-rows.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from bench.serve import environment
from bench.result_files import write_result
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels.cpu import select

WORDS = (Path(__file__).resolve().parent / "datasets" / "words.txt").read_text().split()


def prompts(llm: LLM, count: int, length: int = 80) -> list[list[int]]:
    """`count` distinct prompts of `length` tokens (no shared prefix to cache)."""
    texts = [" ".join(WORDS[(i * 37 + j) % len(WORDS)] for j in range(length)) for i in range(count)]
    return [llm.tokenizer.encode(text)[:length] for text in texts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_many_rows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = LLM(None, device="cpu", kv_cache_gib=1.0)
    plan = select.plan()
    if plan.kernel != "qgemm":
        print(f"the plan keeps no weight quantized here: {plan.reason}")
        return 1
    kernels = ["dequant", *(select.TILE_TERMS if select.tiles_available() else ())]
    rates: dict[int, dict[str, list[float]]] = {c: {k: [] for k in kernels} for c in args.concurrency}
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    try:
        for round_ in range(args.rounds):
            for c in args.concurrency:
                batch = prompts(llm, c)
                for kernel in kernels if round_ % 2 == 0 else kernels[::-1]:
                    select._plan[0] = dataclasses.replace(plan, many_rows=kernel)
                    started = time.perf_counter()
                    outputs = llm.generate(batch, params)
                    elapsed = time.perf_counter() - started
                    rates[c][kernel].append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
    finally:
        select._plan[0] = plan
    results = {}
    for c, per_kernel in rates.items():
        median = {k: statistics.median(v) for k, v in per_kernel.items()}
        results[c] = {k: {"tok_s": round(v, 1), "vs_dequant": round(v / median["dequant"], 2)} for k, v in median.items()}
        print(f"c={c}: " + ", ".join(f"{k} {v:.1f} tok/s ({v / median['dequant']:.2f}x)" for k, v in median.items()),
              flush=True)
    record = {"benchmark": "cpu_many_rows", "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
              "plan": {k: v for k, v in plan.describe().items() if k != "timings_ms"}, "results": results,
              "environment": environment()}
    write_result("cpu-many-rows.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
