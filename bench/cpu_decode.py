"""One stream's decode speed on CPU, before and after the CPU backend, in one run.

Run: python -m bench.cpu_decode [--tokens 64] [--rounds 3] [--threads N]

Two engines on the default model (SmolLM2-135M Q4_1 GGUF): `kernel_backend="torch"` (the plain
reference: weights dequantized to fp32 at load, a dozen torch ops per layer op) and `"cpu"` (GGUF
weights kept quantized, kernels/cpu). Rounds alternate between them; each round is one greedy
completion of `--tokens` tokens after a ~100-token prompt, and the best round counts (a busy
machine only slows runs down). Each step's forward is timed apart, so the per-step host overhead at
c=1 (scheduling, inputs, sampling, detokenizing: the step minus its forward) is reported too. Both
must produce the same tokens. Saves bench/results/cpu-decode.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.serve import environment
from bench.result_files import write_result
from engine.llm import LLM
from engine.sampling_params import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 6


def timed_forwards(llm: LLM) -> list[float]:
    """Wrap the model's forward so each call's seconds land in the returned list."""
    model, times = llm.engine.model, []
    forward = model.forward

    def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
        started = time.perf_counter()
        out = forward(*args, **kwargs)
        times.append(time.perf_counter() - started)
        return out

    setattr(model, "forward", timed)  # an instance attribute shadows the method
    return times


def one_round(llm: LLM, times: list[float], ids: list[int], tokens: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    times.clear()
    started = time.perf_counter()
    (output,) = llm.generate([ids], params)
    elapsed = time.perf_counter() - started
    decode_forwards = times[1:]  # the first forward is the prefill
    step_ms = (elapsed - times[0]) / (tokens - 1) * 1e3
    forward_ms = statistics.mean(decode_forwards) * 1e3
    return {"tok_s": tokens / elapsed, "decode_step_ms": step_ms, "forward_ms": forward_ms,
            "host_overhead_ms": step_ms - forward_ms, "token_ids": output.outputs[0].token_ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's choice)")
    args = parser.parse_args(argv)
    engines = {name: LLM(None, device="cpu", kernel_backend=name, kv_cache_gib=0.1, cpu_threads=args.threads)
               for name in ("torch", "cpu")}
    ids = engines["cpu"].tokenizer.encode(PROMPT)
    timers = {name: timed_forwards(llm) for name, llm in engines.items()}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for index in range(args.rounds + 1):  # round 0 warms up
        for name in (list(engines) if index % 2 else list(reversed(engines))):
            result = one_round(engines[name], timers[name], ids, args.tokens)
            if index:
                rounds[name].append(result)
                print(f"{name:5s} round {index}: {result['tok_s']:.1f} tok/s, step {result['decode_step_ms']:.1f} ms "
                      f"(forward {result['forward_ms']:.1f}, host {result['host_overhead_ms']:.1f})", flush=True)
    best = {name: max(results, key=lambda r: r["tok_s"]) for name, results in rounds.items()}
    same = best["cpu"]["token_ids"] == best["torch"]["token_ids"]
    record = {
        "benchmark": "cpu_decode", "prompt_tokens": len(ids), "output_tokens": args.tokens,
        "threads": torch.get_num_threads(), "same_tokens": same,
        "kernels": engines["cpu"].engine.executor.kernels(),
        "best": {name: {k: round(v, 3) for k, v in r.items() if k != "token_ids"} for name, r in best.items()},
        "speedup": round(best["cpu"]["tok_s"] / best["torch"]["tok_s"], 3),
        "rounds": {name: [{k: round(v, 3) for k, v in r.items() if k != "token_ids"} for r in rs]
                   for name, rs in rounds.items()},
        "environment": environment(),
    }
    write_result("cpu-decode.json", record)
    print(f"c=1 decode: cpu {best['cpu']['tok_s']:.1f} tok/s vs torch {best['torch']['tok_s']:.1f} tok/s "
          f"({record['speedup']:.2f}x); host overhead per step {best['cpu']['host_overhead_ms']:.1f} ms; "
          f"same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
