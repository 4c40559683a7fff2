"""What sampling at temperature 1 costs against greedy decoding at 16 streams on CPU, in one run.

Run: python -m bench.cpu_temperature [--streams 16] [--tokens 64] [--rounds 3] [--threads N]

One engine on the default model (SmolLM2-135M Q4_1) generates `--streams` completions of `--tokens`
tokens each (ignore_eos, ~100-token prompts) per round; rounds alternate greedy (temperature 0) and
temperature 1 (no top-p/top-k/min-p, unseeded: what an OpenAI client sends by default), and each
setting's best round counts (a busy machine only slows rounds down). The sampler's own time per
step is timed apart. The target: temperature 1 within 5% of greedy throughput. Saves
bench/results/cpu-temperature.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.serve import environment
from bench.result_files import write_result
from bench.timed_sampler import TimedSampler
from engine.llm import LLM
from engine.sampling_params import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 6


def timed_sampler(llm: LLM) -> list[float]:
    """Time the runner's sampler; each call's seconds land in the returned list."""
    runner = llm.engine.executor.runner
    sampler = runner.sampler = TimedSampler(runner.sampler.seed)
    return sampler.times


def one_round(llm: LLM, times: list[float], prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    times.clear()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tok_s": generated / elapsed, "sampler_ms_per_step": sum(times) / len(times) * 1e3, "steps": len(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_temperature", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's choice)")
    args = parser.parse_args(argv)
    llm = LLM(None, device="cpu", kv_cache_gib=0.2, cpu_threads=args.threads)
    base = llm.tokenizer.encode(PROMPT)
    prompts = [base[i:] + base[:i] for i in range(args.streams)]  # distinct prompts: no prefix sharing
    times = timed_sampler(llm)
    settings = {"greedy": SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True),
                "temperature 1": SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True)}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for index in range(args.rounds + 1):  # round 0 warms up
        for name in (list(settings) if index % 2 else list(reversed(settings))):
            result = one_round(llm, times, prompts, settings[name])
            if index:
                rounds[name].append(result)
                print(f"{name:13s} round {index}: {result['tok_s']:.1f} tok/s, sampler "
                      f"{result['sampler_ms_per_step']:.2f} ms/step", flush=True)
    best = {name: max(results, key=lambda r: r["tok_s"]) for name, results in rounds.items()}
    cost = 1 - best["temperature 1"]["tok_s"] / best["greedy"]["tok_s"]
    record = {
        "benchmark": "cpu_temperature", "streams": args.streams, "output_tokens": args.tokens,
        "threads": torch.get_num_threads(), "best": best, "rounds": rounds,
        "temperature_1_cost": round(cost, 4), "target": "temperature 1 costs <= 5% of greedy throughput",
        "environment": environment(),
    }
    write_result("cpu-temperature.json", record)
    print(f"c={args.streams}: greedy {best['greedy']['tok_s']:.1f} tok/s, temperature 1 "
          f"{best['temperature 1']['tok_s']:.1f} tok/s: temperature 1 costs {cost * 100:.1f}% "
          f"(sampler {best['greedy']['sampler_ms_per_step']:.2f} vs {best['temperature 1']['sampler_ms_per_step']:.2f} ms/step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
