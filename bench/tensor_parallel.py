"""Tensor parallelism on CPU (gloo): decode step time with 2 ranks vs 1, and the collectives per step.

Run: .venv/bin/python -m bench.tensor_parallel [--model PATH] [--batch 8] [--max-tokens 32]
Without --model the shipped default model (tiny gpt-oss, MXFP4 experts) is used. Both engines run
the same greedy batch side by side in one run; the table reports the median decode step time of each, their
ratio, and the all-reduces / all-gathers each forward ran on rank 0 (expected: 2 per layer + 1 for
the vocab-parallel embedding, and 1 all-gather of the logits). Writes bench/results/tensor-parallel-<device>.json.

On a small CPU two ranks are slower than one: both share the same cores and every all-reduce is a
round trip through gloo. The point here is correctness and the communication count, not speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.result_files import write_result  # noqa: E402
from bench.throughput import commit  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.decoder import DecoderLM  # noqa: E402
from engine.builder import build_engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def decode_round(engine: LLMEngine, batch: int, max_tokens: int) -> tuple[list[float], dict[str, int], dict[str, Any]]:
    """One greedy batch: seconds of each decode step (the prefill step excluded), collectives run, tokens."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [10 + i, 20 + i, 30 + i, 40 + i], params)
    engine.step()  # the prefill
    assert isinstance(engine.model, DecoderLM), "tensor parallelism runs the engine's own decoder"
    counts = engine.model.parallel.counts
    before = dict(counts)
    times: list[float] = []
    tokens: dict[str, Any] = {}
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        for out in outputs:
            tokens[out.request_id] = out.outputs[0].token_ids
    return times, {name: counts[name] - before.get(name, 0) for name in counts}, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # One thread per rank: torch's thread pool on an oversubscribed CPU (this one is shared) can be
    # 20x slower than one thread, which would swamp the comparison. Workers take cores / ranks (1 here).
    torch.set_num_threads(1)
    engines = {tp: build_engine(EngineConfig(
        model=args.model, device="cpu", dtype="float32", kernel_backend="torch", tensor_parallel_size=tp,
        kv_cache_gib=0.05, max_model_len=256)) for tp in (1, 2)}
    try:
        for engine in engines.values():
            decode_round(engine, args.batch, 4)  # warm-up: first calls allocate and initialise
        steps: dict[int, list[float]] = {1: [], 2: []}
        collectives: dict[int, dict[str, float]] = {}
        outputs: dict[int, dict[str, Any]] = {}
        for _ in range(args.rounds):  # alternate, so both see the same background load
            for tp, engine in engines.items():
                times, counts, outputs[tp] = decode_round(engine, args.batch, args.max_tokens)
                steps[tp] += times
                collectives[tp] = {name: count / len(times) for name, count in counts.items()}
        rows: list[dict[str, Any]] = [{"tp": tp, "step_ms": 1000 * statistics.median(steps[tp]), "steps": len(steps[tp]),
                 "layers": engines[tp].model.num_layers, "collectives_per_step": collectives[tp]} for tp in (1, 2)]
    finally:
        for engine in engines.values():
            engine.close()
    same = outputs[1] == outputs[2]
    base = rows[0]["step_ms"]
    print("| ranks | decode step, median (ms) | vs 1 rank | all-reduce / step | all-gather / step | layers |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        per = row["collectives_per_step"]
        print(f"| {row['tp']} | {row['step_ms']:.2f} | {row['step_ms'] / base:.2f}x | "
              f"{per.get('all_reduce', 0):g} | {per.get('all_gather', 0):g} | {row['layers']} |")
    print(f"same greedy tokens: {same}")
    result = {"benchmark": "tensor-parallel", "device": f"cpu ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores)", "commit": commit(),
              "settings": vars(args) | {"backend": "gloo", "dtype": "float32", "model": args.model or "shipped default",
                                        "threads_rank0": 1, "threads_per_worker": max(1, (os.cpu_count() or 1) // 2)},
              "rows": rows, "same_tokens": same, "load_average_1m": os.getloadavg()[0],
              "note": "both engines alive in one run, rounds alternated; the CPU was shared with other processes"}
    write_result("tensor-parallel-cpu.json", result)


if __name__ == "__main__":
    main()
