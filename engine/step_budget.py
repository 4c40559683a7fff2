"""How many prompt tokens a CPU step may compute beside running streams: two cost models fitted online
to the measured steps, one of the streams' steps alone and one of what a prompt chunk adds.

On a CPU every running stream waits for the step that computes a prompt chunk, and what a step costs
depends on more than its token count. A chunk's attention reads all the context computed before it
(its KV bytes, once per step, and its query-key pairs), so 16 prompt tokens at 8k context cost more
than 256 at the start; the decodes' own attention reads their contexts, so a stream's step grows as it
generates. Steps without prompt tokens fit

    alone = q0 + q1 * decode_rows + q2 * decode_pairs

and steps with some fit what they took beyond that prediction as

    extra = a * [prompt chunk] + b * prompt_tokens + k * prompt_context + c * prompt_pairs

(`a`: what any chunk adds, such as matmuls over a few rows instead of one; `prompt_context`: the
tokens computed before each chunk, whose keys and values its attention reads once; `*_pairs`: the
query-key pairs attention scores). Two fits, not one: during a long prefill every step has a chunk, and
the stream's growing context would be indistinguishable from the chunk's. Each fit is least squares
over its steps, older steps weighing exponentially less (the models follow the load and torch's thread
count), with a weak pull toward a seed timed at start-up and no coefficient below zero (a cost cannot be
negative; the features are correlated and would otherwise trade signs).

Beside running decodes a step gets the most prompt tokens whose predicted extra stays within
(STALL_RATIO - 1) x the decodes' predicted step alone: the streams' inter-token time grows by at most
STALL_RATIO while a long prompt prefills. That alone would starve the prompt at long context, where a
chunk's fixed cost (reading the context, the few-row matmuls) nears the allowance and leaves room for
a token or two (an 8k prompt's first token took 363 s against 27.5 s with whole chunks): a step that
pays the fixed cost also gets the tokens that cost as much (TOKEN_SHARE of the chunk's time goes to its
tokens), even past the allowance. On a 2-core CPU at 8k context the fixed cost alone is ~5x a stream's
step, so no chunk keeps the stream within the allowance there; this keeps the prompt's first token
within ~2x of whole chunks instead, and the streams' steps there near 1 + 2 x 5 times their own
(bench/cpu_head_of_line.py measures both).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from engine.model_runner import ModelRunner
from engine.request import Sample

log = logging.getLogger(__name__)

STALL_RATIO = 2.5  # a step with prompt tokens takes at most about this many times the streams' step alone
TOKEN_SHARE = 0.5  # ... or longer, so that at least this share of the chunk's time computes its tokens
MIN_PREFILL_TOKENS = 1  # a long prompt advances even when nothing fits the target
PROBE_PROMPT_TOKENS = 256
PROBE_REPEATS = 3
FORGETTING = 0.98  # each older step weighs this much less: a fit follows about its last 50 steps
# Features are divided by these so each is about 1 at typical sizes (the fits stay well conditioned).
ALONE_SCALE = np.array([1.0, 1.0, 4096.0])  # intercept, decode rows, decode pairs
CHUNK_SCALE = np.array([1.0, 16.0, 4096.0, 65536.0])  # chunk, prompt tokens, prompt context, prompt pairs
PRIOR_WEIGHT = 1.0  # the seed counts as this many steps' worth of evidence
OUTLIER_RATIO = 3.0  # a step slower than this many predicted times counts only this slow (another process stalled it)


def _pairs(context: int, count: int) -> int:
    """Query-key pairs of `count` new tokens after `context` computed ones (causal)."""
    return count * context + count * (count + 1) // 2


@dataclass(frozen=True)
class StepWork:
    """The work of a step, as the cost models read it."""

    decode_rows: int = 0
    decode_pairs: int = 0
    prompt_chunks: int = 0
    prompt_tokens: int = 0
    prompt_context: int = 0
    prompt_pairs: int = 0

    @classmethod
    def of(cls, items: Iterable[tuple[Sample, int]]) -> "StepWork":
        """The work of `(sequence, new tokens)` items before the step advances their computed counts."""
        rows = decode_pairs = chunks = tokens = context = prompt_pairs = 0
        for seq, count in items:
            if seq.prompt_done:
                rows += count
                decode_pairs += _pairs(seq.num_computed_tokens, count)
            else:
                chunks += 1
                tokens += count
                context += seq.num_computed_tokens
                prompt_pairs += _pairs(seq.num_computed_tokens, count)
        return cls(rows, decode_pairs, chunks, tokens, context, prompt_pairs)

    def with_chunk(self, context: int, count: int) -> "StepWork":
        """This work plus `count` prompt tokens after `context` computed ones."""
        if count <= 0:
            return self
        return StepWork(self.decode_rows, self.decode_pairs, self.prompt_chunks + 1, self.prompt_tokens + count,
                        self.prompt_context + context, self.prompt_pairs + _pairs(context, count))

    def alone_features(self) -> np.ndarray:
        scaled: np.ndarray = np.array([1.0, self.decode_rows, self.decode_pairs]) / ALONE_SCALE  # stubs: Any
        return scaled

    def chunk_features(self) -> np.ndarray:
        scaled: np.ndarray = np.array([min(self.prompt_chunks, 1), self.prompt_tokens, self.prompt_context,
                                       self.prompt_pairs]) / CHUNK_SCALE  # numpy's stubs type the division as Any
        return scaled


class NonNegativeFit:
    """Exponentially weighted ridge least squares toward a seed, every coefficient >= 0."""

    def __init__(self, seed: np.ndarray) -> None:
        self.seed = self.theta = seed
        self.gram = np.zeros((len(seed), len(seed)))  # weighted sums of x x^T and x * y
        self.moment = np.zeros(len(seed))

    def predict(self, x: np.ndarray) -> float:
        return float(x @ self.theta)

    def observe(self, x: np.ndarray, y: float) -> None:
        self.gram = FORGETTING * self.gram + np.outer(x, x)
        self.moment = FORGETTING * self.moment + x * y
        self.theta = self.solve()

    def solve(self) -> np.ndarray:
        """Lawson and Hanson's active set on the normal equations, first trying the last fit's nonzero
        coefficients (nearly always still right)."""
        size = len(self.seed)
        gram, moment = self.gram + PRIOR_WEIGHT * np.eye(size), self.moment + PRIOR_WEIGHT * self.seed
        tolerance = 1e-9 * (1.0 + float(np.abs(moment).max()))
        free = self.theta > 0
        if free.any():
            theta = np.zeros(size)
            theta[free] = np.linalg.solve(gram[np.ix_(free, free)], moment[free])
            if (theta[free] > 0).all() and (moment - gram @ theta)[~free].max(initial=0.0) <= tolerance:
                return theta
        theta, free = np.zeros(size), np.zeros(size, dtype=bool)
        for _ in range(3 * size):
            gradient = moment - gram @ theta  # the objective falls along each coefficient with gradient > 0
            candidates = np.where(free, -np.inf, gradient)
            if candidates.max() <= tolerance:
                break
            free[int(candidates.argmax())] = True
            while True:
                trial = np.zeros(size)
                trial[free] = np.linalg.solve(gram[np.ix_(free, free)], moment[free])
                if (trial[free] > 0).all():
                    theta = trial
                    break
                blocked = free & (trial <= 0)  # step toward the trial until a coefficient reaches zero
                gap = theta[blocked] - trial[blocked]
                step = float(np.min(np.where(gap > 0, theta[blocked] / np.where(gap > 0, gap, 1.0), 0.0)))
                theta = theta + step * (trial - theta)
                free &= theta > 1e-12
                theta[~free] = 0.0
        return theta


class StepBudget:
    """The step cost models and the prompt tokens they allow beside running streams."""

    def __init__(self, decode_ms: float, token_ms: float) -> None:
        self.decode_ms, self.token_ms = decode_ms, token_ms  # the start-up measurement
        self.alone = NonNegativeFit(np.array([0.0, decode_ms, 0.0]) * ALONE_SCALE)  # ms per scaled feature
        self.chunk = NonNegativeFit(np.array([0.0, token_ms, 0.0, 0.0]) * CHUNK_SCALE)
        self.steps_observed = 0
        self.last_prefill_tokens: int | None = None  # the most recent step's allowance (stats)

    def alone_ms(self, work: StepWork) -> float:
        """Predicted milliseconds of the step's decodes alone (its prompt work left out)."""
        return self.alone.predict(work.alone_features())

    def extra_ms(self, work: StepWork) -> float:
        """Predicted milliseconds the step's prompt work adds."""
        return self.chunk.predict(work.chunk_features()) if work.prompt_chunks else 0.0

    def step_ms(self, work: StepWork) -> float:
        return self.alone_ms(work) + self.extra_ms(work)

    def observe(self, work: StepWork, seconds: float) -> None:
        """Learn from one measured step: one without prompt tokens refits the streams' step alone, one with
        some refits what its chunk added."""
        ms = min(seconds * 1e3, OUTLIER_RATIO * max(self.step_ms(work), 1e-3))
        self.steps_observed += 1
        if work.prompt_chunks:
            self.chunk.observe(work.chunk_features(), ms - self.alone_ms(work))
        else:
            self.alone.observe(work.alone_features(), ms)

    def prefill_tokens(self, decodes: StepWork, context: int, limit: int) -> int:
        """The most prompt tokens (after `context` computed ones, at most `limit`) a step beside `decodes` may
        compute: predicted within STALL_RATIO x the decodes' step alone, or at least the tokens that take
        TOKEN_SHARE of the chunk's time beside its fixed cost (what a chunk at this context costs at all)."""
        a, b, k, c = self.chunk.theta / CHUNK_SCALE
        fixed = a + k * context
        allowed = max((STALL_RATIO - 1) * self.alone_ms(decodes), fixed / (1 - TOKEN_SHARE))
        # extra(n) = fixed + b n + c (n context + n (n + 1) / 2): the largest n with extra(n) <= allowed
        linear, spare = b + c * (context + 0.5), allowed - fixed
        if spare < 0:
            count = 0
        elif c > 0:
            count = int((-linear + np.sqrt(linear * linear + 2 * c * spare)) / c)
        else:
            count = int(spare / linear) if linear > 0 else max(limit, 0)
        self.last_prefill_tokens = min(max(count, MIN_PREFILL_TOKENS), max(limit, 0))
        return self.last_prefill_tokens

    def describe(self) -> str:
        q0, q1, q2 = self.alone.theta / ALONE_SCALE
        a, b, k, c = self.chunk.theta / CHUNK_SCALE
        return (f"step budget: streams alone {q0:.1f} ms + {q1:.1f} ms per decode row (start-up {self.decode_ms:.1f}) "
                f"+ {q2 * 1e3:.3f} ms per 1k decode context; a prompt chunk adds {a:.1f} ms + {b:.3f} ms/token "
                f"(start-up {self.token_ms:.3f}) + {k * 1e3:.3f} ms per 1k context + {c * 1e3:.4f} ms per 1k attention "
                f"pairs; prompt tokens beside running streams keep a step within {STALL_RATIO:g}x their step alone "
                f"(or longer where {TOKEN_SHARE:.0%} of a chunk's time then computes its tokens)")


def measure(runner: ModelRunner, max_tokens: int) -> StepBudget:
    """The cost model for this model on this machine, seeded by timing a decode and a prompt forward."""
    prompt = max(2, min(PROBE_PROMPT_TOKENS, max_tokens, runner.max_blocks * runner.block_size))
    decode_ms = runner.best_forward_ms(1, 1, PROBE_REPEATS)
    token_ms = max(runner.best_forward_ms(1, prompt, PROBE_REPEATS) - decode_ms, 1e-6) / (prompt - 1)
    budget = StepBudget(decode_ms, token_ms)
    log.info(budget.describe())
    return budget
