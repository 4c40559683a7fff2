"""Scheduler + runner-input overhead per decode step with 256 running sequences and a free fake model.

Run: .venv/bin/python bench/scheduler_overhead.py [--seqs 256] [--steps 200]
Prints the median milliseconds of schedule() + after_step() + token append (no model, no sampler).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kv_cache import BlockPool  # noqa: E402
from engine.request import Sequence  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402


def measure(num_seqs: int, steps: int, prompt_len: int = 64, block_size: int = 16) -> list[float]:
    pool = BlockPool(num_seqs * ((prompt_len + steps) // block_size + 2), block_size)
    scheduler = Scheduler(pool, max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * prompt_len)
    params = SamplingParams(max_tokens=steps + 1)
    for i in range(num_seqs):
        scheduler.add(Sequence(str(i), 0, [i % 100 + j for j in range(prompt_len)], params, steps + 1))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        batch = scheduler.schedule()
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
    times = measure(args.seqs, args.steps)
    print(f"scheduler overhead, {args.seqs} running sequences: median {statistics.median(times) * 1e3:.3f} ms/step "
          f"(p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
