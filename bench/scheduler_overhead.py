"""Scheduler overhead per decode step with 256 running sequences and a model that costs nothing.

Run: .venv/bin/python -m bench.scheduler_overhead [--seqs 256] [--steps 200]
Prints the median milliseconds of schedule() + after_step() + token append, and the same plus the
model runner's input tensors (ids, positions, slot mapping, block tables, ...), with no model or sampler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.kv_cache import BlockPool  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.request import Sequence  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402


class NullModel:
    """The KV-cache shape fields of a CausalLM and nothing else."""

    num_layers, num_kv_heads, head_dim, vocab_size = 1, 1, 1, 2
    dtype, kv_cache_dtype, device = torch.float32, torch.float32, torch.device("cpu")

    def bind_kv_caches(self, kv_caches) -> None:
        pass


def measure(num_seqs: int, steps: int, with_inputs: bool, prompt_len: int = 64, block_size: int = 16) -> list[float]:
    num_blocks = num_seqs * ((prompt_len + steps) // block_size + 2)
    pool = BlockPool(num_blocks, block_size)
    runner = ModelRunner(NullModel(), num_blocks, block_size)
    scheduler = Scheduler(pool, max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * prompt_len)
    params = SamplingParams(max_tokens=steps + 1)
    for i in range(num_seqs):
        scheduler.add(Sequence(str(i), 0, [i % 100 + j for j in range(prompt_len)], params, steps + 1))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        batch = scheduler.schedule()
        if with_inputs:
            runner.build_inputs(batch.items, list(range(len(batch.items))))
        scheduler.after_step(batch)
        for seq, _ in batch.items:
            seq.output_token_ids.append(step)
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step is the prefill of every prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    for with_inputs in (False, True):
        times = measure(args.seqs, args.steps, with_inputs)
        what = "scheduler + runner inputs" if with_inputs else "scheduler"
        print(f"{what}, {args.seqs} running sequences: median {statistics.median(times) * 1e3:.3f} ms/step "
              f"(p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
