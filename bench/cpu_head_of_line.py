"""A running stream's inter-token time while an 8,000-token prompt prefills, on CPU, with and without
the latency-aware step budget, in one run.

Run: python -m bench.cpu_head_of_line [--long-prompt 8000] [--quiet-tokens 24]

For each setting, an engine on the default model (SmolLM2-135M Q4_1) decodes one short stream:
first `--quiet-tokens` tokens alone (its quiet inter-token times), then while a `--long-prompt`-token
prompt is prefilled beside it (its loaded inter-token times, until the prompt's first token). The
settings: `--max-num-batched-tokens 2048` (a whole 2,048-token chunk per step: before) and the
default, where the start-up measurement caps prompt tokens beside running streams (after). The
target is loaded p99 <= 3x quiet p99. The stream generates thousands of tokens while the prompt
prefills, and its own step grows with its context (fp32 KV on one core: ~14 ms at 30 tokens, ~40 ms
at 4k), so the stream then runs alone again for `--quiet-tokens` at the context it reached, and
`p99_ratio_same_context` compares each gap with the quiet step at its own context (interpolated
between the two quiet runs): what the prompt costs the stream, not what its own context does.
Saves bench/results/cpu-head-of-line.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from bench.serve import environment
from bench.result_files import write_result
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.builder import build_engine
from engine.sampling_params import SamplingParams

KV_CACHE_GIB = 1.0  # SmolLM2: ~23k tokens, room for the prompt and the stream, so nothing is preempted


def measure(engine: LLMEngine, long_prompt: int, quiet_tokens: int) -> dict[str, Any]:
    vocab = engine.model.vocab_size
    stream_ids = engine.tokenizer.encode("Tell me about the sea and the ships that sail on it.")
    engine.add_request("stream", stream_ids, SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True))
    stamps: list[float] = []
    long_first_token = None

    def step() -> None:
        nonlocal long_first_token
        for output in engine.step():
            if output.request_id == "stream" and output.outputs[0].token_ids:
                stamps.append(time.perf_counter())
            elif output.request_id == "long" and output.outputs[0].token_ids:
                long_first_token = time.perf_counter()

    while len(stamps) < quiet_tokens + 1:
        step()
    quiet = np.diff(stamps[1:]) * 1e3  # from the second token: the first follows the prefill
    loaded_from = len(stamps)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    engine.add_request("long", rng.integers(100, vocab - 100, long_prompt).tolist(),
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while long_first_token is None:
        step()
    loaded = np.diff(stamps[loaded_from - 1:]) * 1e3
    after_from = len(stamps)
    while len(stamps) < after_from + quiet_tokens + 1:
        step()
    quiet_after = np.diff(stamps[after_from:]) * 1e3  # from the first gap wholly after the prompt
    engine.abort("stream")

    def at_context(gaps: np.ndarray, first: int) -> np.ndarray:
        """Each gap over the quiet step at the stream's context then (its `first`th token onwards)."""
        contexts = len(stream_ids) + first + np.arange(len(gaps))
        ends = (len(stream_ids) + 1 + quiet_tokens / 2, len(stream_ids) + after_from + quiet_tokens / 2)
        return gaps / np.interp(contexts, ends, (np.median(quiet), np.median(quiet_after)))

    same_context_quiet = np.concatenate((at_context(quiet, 1), at_context(quiet_after, after_from)))
    return {
        "quiet_itl_ms": {"p50": float(np.percentile(quiet, 50)), "p99": float(np.percentile(quiet, 99))},
        "loaded_itl_ms": {"p50": float(np.percentile(loaded, 50)), "p99": float(np.percentile(loaded, 99)),
                          "max": float(loaded.max())},
        "p99_ratio": float(np.percentile(loaded, 99) / np.percentile(quiet, 99)),
        "quiet_after_itl_ms": {"p50": float(np.percentile(quiet_after, 50)),
                               "p99": float(np.percentile(quiet_after, 99))},
        "stream_context_after": len(stream_ids) + after_from,
        "p99_ratio_same_context": float(np.percentile(at_context(loaded, loaded_from - 1), 99)
                                        / np.percentile(same_context_quiet, 99)),
        "long_prompt_ttft_s": long_first_token - started,
        "stream_tokens_during_prefill": len(loaded),
        "preemptions": engine.scheduler.num_preemptions,
        "step_budget": engine.step_budget.describe() if engine.step_budget is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_head_of_line", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long-prompt", type=int, default=8000)
    parser.add_argument("--quiet-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    results = {}
    for name, budget in (("before: 2048-token chunks", 2048), ("after: latency-aware budget", None)):
        config = EngineConfig(device="cpu", kv_cache_gib=KV_CACHE_GIB, max_num_batched_tokens=budget, cpu_threads=args.threads)
        engine = build_engine(config)
        results[name] = measure(engine, args.long_prompt, args.quiet_tokens)
        engine.close()
        r = results[name]
        print(f"{name}: quiet p99 {r['quiet_itl_ms']['p99']:.0f} ms (after, at {r['stream_context_after']} tokens: "
              f"{r['quiet_after_itl_ms']['p99']:.0f} ms), while prefilling p99 {r['loaded_itl_ms']['p99']:.0f} ms "
              f"({r['p99_ratio']:.1f}x; at the same context {r['p99_ratio_same_context']:.1f}x), long prompt's TTFT "
              f"{r['long_prompt_ttft_s']:.1f} s", flush=True)
    record = {"benchmark": "cpu_head_of_line", "long_prompt_tokens": args.long_prompt, "results": results,
              "target": "loaded p99 <= 3x quiet p99 (p99_ratio_same_context: each gap against the quiet step at its "
                        "context)", "environment": environment()}
    write_result("cpu-head-of-line.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
