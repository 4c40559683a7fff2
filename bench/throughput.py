"""Offline throughput: N prompts generated together vs one at a time, through LLMEngine.

Run: .venv/bin/python -m bench.throughput [--model PATH] [--num-prompts 32] [--max-tokens 32]
Without --model a tiny random Llama is built (CPU). Writes a table to stdout and JSON to
bench/results/throughput-<device>.json with device, commit and settings.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.builder import build_engine  # noqa: E402
from bench.result_files import write_result  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def tiny_model() -> str:
    from tests.server_fixtures import save_tiny_llama

    return str(save_tiny_llama(Path(tempfile.mkdtemp(prefix="minerva-bench-")) / "tiny-llama"))


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, batched: bool) -> dict[str, float]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params) if batched else [o for p in prompts for o in llm.generate([p], params)]
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": elapsed, "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": generated / elapsed}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    model = args.model or tiny_model()
    llm = LLM.from_engine(build_engine(EngineConfig(model=model, device=args.device, kv_cache_gib=0.05)))
    vocab = llm.engine.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up
    single = run(llm, prompts, params, batched=False)
    batched = run(llm, prompts, params, batched=True)
    device = torch.cuda.get_device_name() if llm.engine.model.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    result: dict[str, Any] = {"device": device, "commit": commit(), "model": args.model or "tiny random Llama (2 layers, hidden 64)",
              "settings": vars(args), "one_at_a_time": single, "batched": batched,
              "batched_over_single": batched["output_tokens_per_s"] / single["output_tokens_per_s"]}
    print("| mode | requests/s | output tokens/s |\n|---|---|---|")
    for name in ("one_at_a_time", "batched"):
        print(f"| {name} | {result[name]['requests_per_s']:.2f} | {result[name]['output_tokens_per_s']:.1f} |")
    print(f"batched / one-at-a-time: {result['batched_over_single']:.2f}x")
    name = "cuda" if llm.engine.model.device.type == "cuda" else "cpu"
    write_result(f"throughput-{name}.json", result)


if __name__ == "__main__":
    main()
