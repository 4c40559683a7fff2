"""The engine's sampler with each call's seconds kept, for benchmarks that report the sampler's share of a step
apart (bench.step_overhead, bench.cpu_temperature)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from engine.sampler import SampleResult, Sampler, SamplingRow


class TimedSampler(Sampler):
    """A Sampler whose calls' seconds, until their tokens are read (the device-to-host copy is the sampler's
    share), land in `times`. Put in place of the runner's before any request arrives: it starts empty."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.times: list[float] = []

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 token_bitmask: torch.Tensor | None = None) -> SampleResult:
        started = time.perf_counter()
        result = super().__call__(logits, rows, token_bitmask)
        result.token_ids  # the sampler's work ends when its tokens are read
        self.times.append(time.perf_counter() - started)
        return result
