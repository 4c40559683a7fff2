"""Single-stream decode on CPU with and without a busy neighbour process, before and after engine/cpu_threads.py.

Run: python -m bench.cpu_threads [--model PATH] [--tokens 64] [--rounds 2]

Each measurement is a fresh process (OpenMP reads OMP_WAIT_POLICY once, at torch's load) that
builds the engine, warms up, and times one greedy stream of `--tokens` tokens (`ignore_eos`):
- before: torch's default threading (one thread per allowed CPU, OMP_WAIT_POLICY unset);
- after: what the server does now (OMP_WAIT_POLICY=PASSIVE, thread count from engine/cpu_threads.py).
Conditions: quiet; a hog (one spinning Python process) already running when the engine starts;
the hog started after the engine has chosen its threads. Configurations and conditions take
turns for `--rounds` rounds, so other load on the machine falls on all alike; medians are reported
with each condition's tok/s over the quiet figure of the same configuration. Saves
bench/results/cpu-threads.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.result_files import write_result

CONFIGS = ("before", "after")
CONDITIONS = ("quiet", "hog at start", "hog after start")
HOG = [sys.executable, "-c", "while True: pass"]


def child(model: str | None, config: str, tokens: int, hog_after_start: bool) -> None:
    """One measurement in this process: print {"tok_s", "threads"} as JSON."""
    import torch

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    cpu_threads = len(os.sched_getaffinity(0)) if config == "before" else None
    llm = LLM(model, device="cpu", max_model_len=512, kv_cache_gib=0.25, cpu_threads=cpu_threads)
    prompt = llm.tokenizer.encode("Write a short story about a lighthouse keeper and a storm.")
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    hog = subprocess.Popen(HOG) if hog_after_start else None
    try:
        if hog is not None:
            time.sleep(0.5)
        started = time.perf_counter()
        output = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))[0]
        elapsed = time.perf_counter() - started
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    generated = len(output.outputs[0].token_ids)
    print(json.dumps({"tok_s": generated / elapsed, "threads": torch.get_num_threads()}))


def measure(args: argparse.Namespace, config: str, condition: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    if config == "after":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, "-m", "bench.cpu_threads", "--child", config, "--tokens", str(args.tokens)]
    if args.model:
        command += ["--model", args.model]
    if condition == "hog after start":
        command.append("--hog-after-start")
    hog = subprocess.Popen(HOG) if condition == "hog at start" else None
    try:
        if hog is not None:
            time.sleep(0.5)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parents[1])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise RuntimeError(f"{config} / {condition} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model path or built-in name (default: the default built-in model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--hog-after-start", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.tokens, args.hog_after_start)
        return
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(c, k): [] for c in CONFIGS for k in CONDITIONS}
    for round_index in range(args.rounds):
        order = [(c, k) for c in CONFIGS for k in CONDITIONS]
        for config, condition in order if round_index % 2 == 0 else reversed(order):
            result = measure(args, config, condition)
            runs[config, condition].append(result)
            print(f"round {round_index + 1}: {config:6s} {condition:15s} {result['tok_s']:6.1f} tok/s "
                  f"({result['threads']} threads)", file=sys.stderr)
    rows = []
    for config in CONFIGS:
        quiet = statistics.median(r["tok_s"] for r in runs[config, "quiet"])
        for condition in CONDITIONS:
            tok_s = statistics.median(r["tok_s"] for r in runs[config, condition])
            rows.append({"config": config, "condition": condition, "tok_s": round(tok_s, 2),
                         "vs_quiet": round(tok_s / quiet, 3),
                         "threads": [r["threads"] for r in runs[config, condition]],
                         "runs_tok_s": [round(r["tok_s"], 2) for r in runs[config, condition]]})
    report = {"command": "python -m bench.cpu_threads " + " ".join(sys.argv[1:]), "cpus": len(os.sched_getaffinity(0)),
              "model": args.model or "default built-in (SmolLM2-135M-Instruct)", "tokens": args.tokens,
              "rounds": args.rounds, "rows": rows}
    write_result("cpu-threads.json", report)
    print("| config | condition | tok/s | vs quiet | threads |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['condition']} | {row['tok_s']:.1f} | {row['vs_quiet']:.2f} | "
              f"{','.join(map(str, row['threads']))} |")


if __name__ == "__main__":
    main()
