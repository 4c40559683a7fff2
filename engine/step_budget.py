"""How many prompt tokens a CPU step may compute beside running streams: the streams' measured
inter-token time and a cost model of prompt chunks, fitted online to the measured steps.

On a CPU every running stream waits for the step that computes a prompt chunk, and what a chunk
costs depends on more than its length: its attention reads all the context computed before it, so
16 prompt tokens at 8k context cost more than 256 at the start. Two things are measured on every
step: the time of steps without prompt tokens (`quiet_ms`, the streams' inter-token time), and, for
steps with some, what they took beyond it, modelled as

    extra = a + b * prompt_tokens + c * prompt_pairs

(`a`: what any step with a prompt chunk adds, such as matmuls over a few rows instead of one;
`prompt_pairs`: the query-key pairs the chunks' attention scores). `b` is seeded by timing forwards
of the served model at start-up; every step with prompt tokens refits all three by least squares
over the measured steps, older steps weighing exponentially less (the model follows the load and
torch's thread count), with a weak pull toward the seed and no coefficient below zero (a cost
cannot be negative; the features are correlated and would otherwise trade signs). Beside running decodes a step gets the most prompt tokens whose predicted extra stays
within (STALL_RATIO - 1) x quiet_ms, and at least MIN_PREFILL_TOKENS so a long prompt always advances.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from engine.model_runner import ModelRunner
from engine.request import Sample

log = logging.getLogger(__name__)

STALL_RATIO = 2.0  # a step with prompt tokens takes at most about this many quiet steps
MIN_PREFILL_TOKENS = 1  # a long prompt advances even when nothing fits the target
PROBE_PROMPT_TOKENS = 256
PROBE_REPEATS = 3
FORGETTING = 0.98  # each older step weighs this much less: the fit follows about the last 50 chunk steps
QUIET_SMOOTHING = 0.05  # weight of each decode-only step in quiet_ms
# Features are divided by these so each is about 1 at typical sizes (the fit stays well conditioned).
FEATURE_SCALE = np.array([1.0, 16.0, 65536.0])
PRIOR_WEIGHT = 1.0  # the seed counts as this many steps' worth of evidence
OUTLIER_RATIO = 3.0  # a step slower than this many predicted times counts only this slow (another process stalled it)


@dataclass(frozen=True)
class StepWork:
    """The prompt work of a step, as the cost model reads it."""

    prompt_tokens: int = 0
    prompt_pairs: int = 0

    @classmethod
    def of(cls, items: Iterable[tuple[Sample, int]]) -> "StepWork":
        """The work of `(sequence, new tokens)` items before the step advances their computed counts."""
        tokens = pairs = 0
        for seq, count in items:
            if not seq.prompt_done:
                tokens += count
                pairs += count * seq.num_computed_tokens + count * (count + 1) // 2
        return cls(tokens, pairs)

    @classmethod
    def chunk(cls, context: int, count: int) -> "StepWork":
        """`count` prompt tokens after `context` computed ones."""
        return cls(count, count * context + count * (count + 1) // 2)

    def features(self) -> np.ndarray:
        scaled: np.ndarray = (np.array([1.0 if self.prompt_tokens else 0.0, self.prompt_tokens, self.prompt_pairs])
                              / FEATURE_SCALE)  # numpy's stubs type the division as Any
        return scaled


class StepBudget:
    """The streams' quiet step time, the prompt-chunk cost model, and the prompt tokens they allow."""

    def __init__(self, decode_ms: float, token_ms: float) -> None:
        self.decode_ms, self.token_ms = decode_ms, token_ms  # the start-up measurement
        self.quiet_ms = decode_ms
        self.seed = np.array([0.0, token_ms, 0.0]) * FEATURE_SCALE  # ms per scaled feature
        self.theta = self.seed
        self.gram = np.zeros((3, 3))  # exponentially weighted sums of x x^T and x * extra over chunk steps
        self.moment = np.zeros(3)
        self.steps_observed = 0
        self.last_prefill_tokens: int | None = None  # the most recent step's allowance (stats)

    def extra_ms(self, work: StepWork) -> float:
        """Predicted milliseconds the prompt work adds to a step."""
        return float(work.features() @ self.theta)

    def observe(self, work: StepWork, seconds: float) -> None:
        """Learn from one measured step: a quiet step moves quiet_ms, a step with prompt tokens refits the
        chunk cost."""
        ms = seconds * 1e3
        self.steps_observed += 1
        if work.prompt_tokens == 0:
            self.quiet_ms += QUIET_SMOOTHING * (min(ms, OUTLIER_RATIO * self.quiet_ms) - self.quiet_ms)
            return
        x = work.features()
        predicted = self.quiet_ms + float(x @ self.theta)
        extra = min(ms, OUTLIER_RATIO * predicted) - self.quiet_ms
        self.gram = FORGETTING * self.gram + np.outer(x, x)
        self.moment = FORGETTING * self.moment + x * extra
        self.theta = self._fit()

    def _fit(self) -> np.ndarray:
        """Ridge least squares toward the seed with every coefficient >= 0: the best of the unconstrained fits
        over each subset of coefficients (the others held at zero) that come out non-negative."""
        gram, moment = self.gram + PRIOR_WEIGHT * np.eye(3), self.moment + PRIOR_WEIGHT * self.seed
        best, best_loss = np.zeros(3), 0.0
        for free in itertools.product((False, True), repeat=3):
            index = np.flatnonzero(free)
            if not len(index):
                continue
            theta = np.zeros(3)
            theta[index] = np.linalg.solve(gram[np.ix_(index, index)], moment[index])
            loss = float(theta @ gram @ theta - 2 * moment @ theta)  # the ridge objective up to a constant
            if (theta >= 0).all() and loss < best_loss:
                best, best_loss = theta, loss
        return best

    def prefill_tokens(self, context: int, limit: int) -> int:
        """The most prompt tokens (after `context` computed ones, at most `limit`) a step beside running
        decodes may compute with its predicted extra time within (STALL_RATIO - 1) x quiet_ms."""
        allowed = (STALL_RATIO - 1) * self.quiet_ms
        low, high = 0, max(limit, 0)
        while low < high:  # the prediction grows with the chunk: bisect for the largest that fits
            middle = (low + high + 1) // 2
            if self.extra_ms(StepWork.chunk(context, middle)) <= allowed:
                low = middle
            else:
                high = middle - 1
        self.last_prefill_tokens = min(max(low, MIN_PREFILL_TOKENS), max(limit, 0))
        return self.last_prefill_tokens

    def describe(self) -> str:
        a, b, c = self.theta / FEATURE_SCALE
        return (f"step budget: quiet step {self.quiet_ms:.1f} ms (start-up decode forward {self.decode_ms:.1f} ms), "
                f"prompt chunks {a:.1f} ms + {b:.3f} ms/token (start-up {self.token_ms:.3f}) + {c * 1e3:.4f} ms per 1k attention "
                f"pairs; prompt tokens beside running streams keep a step within {STALL_RATIO:g}x a quiet step")


def measure(runner: ModelRunner, max_tokens: int) -> StepBudget:
    """The cost model for this model on this machine, seeded by timing a decode and a prompt forward."""
    prompt = max(2, min(PROBE_PROMPT_TOKENS, max_tokens, runner.max_blocks * runner.block_size))
    decode_ms = runner.best_forward_ms(1, 1, PROBE_REPEATS)
    token_ms = max(runner.best_forward_ms(1, prompt, PROBE_REPEATS) - decode_ms, 1e-6) / (prompt - 1)
    budget = StepBudget(decode_ms, token_ms)
    log.info(budget.describe())
    return budget
