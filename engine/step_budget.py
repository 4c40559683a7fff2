"""How many prompt tokens a CPU step may compute beside running streams, measured at start-up.

On a CPU a 2,048-token prefill chunk takes seconds, and every running stream waits for the step
that computes it. A step of decodes plus `P` prompt tokens costs about `t_decode + P * t_token`,
so holding it to `STALL_RATIO` x a decode step (the streams' inter-token time) gives
`P = (STALL_RATIO - 1) * t_decode / t_token`. Both times come from forwards of the served model on
the runner's scratch block (best of a few: a busy machine only slows them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

STALL_RATIO = 2.0  # a step with prompt tokens takes at most about this many decode steps
PROBE_PROMPT_TOKENS = 256
PROBE_REPEATS = 3
MIN_PREFILL_TOKENS = 16  # long prompts still advance when the measurement says almost nothing fits


@dataclass(frozen=True)
class StepBudget:
    prefill_tokens: int  # prompt tokens a step may add beside running decodes
    decode_ms: float  # one single-stream decode forward
    token_ms: float  # each further prompt token of a prefill forward

    def describe(self) -> str:
        return (f"step budget: {self.prefill_tokens} prompt tokens beside running streams (decode forward "
                f"{self.decode_ms:.1f} ms, {self.token_ms:.3f} ms per prompt token, stall <= {STALL_RATIO:g}x)")


def _best_ms(runner: ModelRunner, num_tokens: int) -> float:
    inputs = runner.scratch_inputs(1, num_tokens)
    best = float("inf")
    with torch.no_grad():
        for _ in range(PROBE_REPEATS + 1):  # the first run warms up
            started = time.perf_counter()
            runner.model.forward(inputs.input_ids, inputs.positions, inputs.metadata)
            best = min(best, (time.perf_counter() - started) * 1e3)
    return best


def measure(runner: ModelRunner, max_tokens: int) -> StepBudget:
    """The budget for this model on this machine; never more than `max_tokens`."""
    prompt = max(2, min(PROBE_PROMPT_TOKENS, max_tokens, runner.max_blocks * runner.block_size))
    decode_ms = _best_ms(runner, 1)
    token_ms = max(_best_ms(runner, prompt) - decode_ms, 1e-6) / (prompt - 1)
    tokens = int((STALL_RATIO - 1) * decode_ms / token_ms)
    budget = StepBudget(min(max_tokens, max(MIN_PREFILL_TOKENS, tokens)), decode_ms, token_ms)
    log.info(budget.describe())
    return budget
