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
query-key pairs attention scores; a step that runs a share of a split chunk's layers counts its extra
divided by that share, a whole chunk's worth). Two fits, not one: during a long prefill every step has a chunk, and
the stream's growing context would be indistinguishable from the chunk's. Each fit is least squares
over its steps, older steps weighing exponentially less (the models follow the load and torch's thread
count), with a weak pull toward a seed timed at start-up and no coefficient below zero (a cost cannot be
negative; the features are correlated and would otherwise trade signs).

Beside running decodes a step may add at most (STALL_RATIO - 1) x the decodes' predicted step alone:
the streams' inter-token time grows by at most STALL_RATIO while a long prompt prefills. Where a whole
chunk fits, the step gets the most prompt tokens within that. At long context a chunk's fixed cost
(reading the context, the few-row matmuls) alone passes it: on a 2-core CPU at 8k context ~7x a
stream's step. There the chunk is split by layers (`plan`): each step runs the decodes' whole forward
and the next group of the chunk's layers, so a step pays only that group's share of the chunk, and the
chunk's size and group are chosen for the most prompt tokens per step within the allowance (several
steps per chunk, the fixed cost paid once). A prompt that cannot be split (prompt logprobs score every
row at the last layer) runs whole chunks, which at least get the tokens that cost as much as the fixed
part (TOKEN_SHARE of the chunk's time goes to its tokens), even past the allowance, so it is not starved.
bench/cpu_head_of_line.py measures both sides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from engine.model_runner import ModelRunner
from engine.request import Sample

log = logging.getLogger(__name__)

STALL_RATIO = 2.0  # a step with prompt tokens takes at most about this many times the streams' step alone
TOKEN_SHARE = 0.5  # ... or longer, so that at least this share of the chunk's time computes its tokens
MIN_PREFILL_TOKENS = 1  # a long prompt advances even when nothing fits the target
PROBE_PROMPT_TOKENS = 256
PROBE_REPEATS = 3
FORGETTING = 0.98  # each older step weighs this much less: a fit follows about its last 50 steps
# Features are divided by these so each is about 1 at typical sizes (the fits stay well conditioned).
ALONE_SCALE = np.array([1.0, 1.0, 4096.0])  # intercept, decode rows, decode pairs
CHUNK_SCALE = np.array([1.0, 16.0, 4096.0, 65536.0])  # chunk, prompt tokens, prompt context, prompt pairs
PRIOR_WEIGHT = 1.0  # the seed counts as this many steps' worth of evidence
# During a long prefill every step has a chunk, so the streams' step alone would never be measured again while their
# contexts grow (a decode at 4k context costs ~3x one at 30, fp32 KV on one core): one step in this many runs them alone.
ALONE_EVERY = 32
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
    layer_share: float = 1.0  # the share of the model's layers the prompt chunk runs this step (split chunks)

    @classmethod
    def of(cls, items: Iterable[tuple[Sample, int]], layer_share: float = 1.0) -> "StepWork":
        """The work of `(sequence, new tokens)` items before the step advances their computed counts."""
        rows = decode_pairs = chunks = tokens = context = prompt_pairs = 0
        for seq, count in items:
            if seq.num_remaining <= 1:  # a decode (with any drafts), or a prompt's last token
                rows += count
                decode_pairs += _pairs(seq.num_computed_tokens, count)
            else:
                chunks += 1
                tokens += count
                context += seq.num_computed_tokens
                prompt_pairs += _pairs(seq.num_computed_tokens, count)
        return cls(rows, decode_pairs, chunks, tokens, context, prompt_pairs, layer_share)

    def with_chunk(self, context: int, count: int) -> "StepWork":
        """This work plus `count` prompt tokens after `context` computed ones."""
        if count <= 0:
            return self
        return StepWork(self.decode_rows, self.decode_pairs, self.prompt_chunks + 1, self.prompt_tokens + count,
                        self.prompt_context + context, self.prompt_pairs + _pairs(context, count), self.layer_share)

    def alone_features(self) -> np.ndarray:
        scaled: np.ndarray = np.array([1.0, self.decode_rows, self.decode_pairs]) / ALONE_SCALE  # stubs: Any
        return scaled

    def chunk_features(self) -> np.ndarray:
        """Of the whole chunk, all its layers (a split step's extra is `layer_share` of what they predict)."""
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

    def __init__(self, decode_ms: float, token_ms: float, num_layers: int = 1) -> None:
        self.decode_ms, self.token_ms = decode_ms, token_ms  # the start-up measurement
        self.num_layers = num_layers  # a chunk may be split into groups of the model's layers (1: never)
        self.alone = NonNegativeFit(np.array([0.0, decode_ms, 0.0]) * ALONE_SCALE)  # ms per scaled feature
        self.chunk = NonNegativeFit(np.array([0.0, token_ms, 0.0, 0.0]) * CHUNK_SCALE)
        self.steps_observed = 0
        self.steps_since_alone = 0  # steps with prompt work since the streams' step alone was last measured
        self.last_prefill_tokens: int | None = None  # the most recent step's allowance (stats)

    def alone_ms(self, work: StepWork) -> float:
        """Predicted milliseconds of the step's decodes alone (its prompt work left out)."""
        return self.alone.predict(work.alone_features())

    def extra_ms(self, work: StepWork) -> float:
        """Predicted milliseconds the step's prompt work adds."""
        return work.layer_share * self.chunk.predict(work.chunk_features()) if work.prompt_chunks else 0.0

    def step_ms(self, work: StepWork) -> float:
        return self.alone_ms(work) + self.extra_ms(work)

    def observe(self, work: StepWork, seconds: float) -> None:
        """Learn from one measured step: one without prompt tokens refits the streams' step alone, one with
        some refits what its chunk added."""
        ms = min(seconds * 1e3, OUTLIER_RATIO * max(self.step_ms(work), 1e-3))
        self.steps_observed += 1
        if work.prompt_chunks:  # a split step counts as a whole chunk's worth: its extra over its share of the layers
            self.chunk.observe(work.chunk_features(), (ms - self.alone_ms(work)) / work.layer_share)
            self.steps_since_alone += 1
        else:
            self.alone.observe(work.alone_features(), ms)
            self.steps_since_alone = 0

    def wants_alone_step(self) -> bool:
        """Whether the next step should run the streams alone, to measure their step as their contexts grow."""
        return self.steps_since_alone >= ALONE_EVERY

    def prefill_tokens(self, decodes: StepWork, context: int, limit: int) -> int:
        """The most prompt tokens (after `context` computed ones, at most `limit`) a whole chunk beside `decodes` may
        compute: predicted within STALL_RATIO x the decodes' step alone, or at least the tokens that take
        TOKEN_SHARE of the chunk's time beside its fixed cost (what a chunk at this context costs at all)."""
        fixed = self._fixed_ms(context)
        allowed = max(self._allowed_ms(decodes), fixed / (1 - TOKEN_SHARE))
        return self._record(self._tokens_within(allowed, context, limit), limit)

    def plan(self, decodes: StepWork, context: int, limit: int) -> int:
        """The prompt tokens of a chunk beside `decodes` that may be split by layers (`layers_per_step` says how):
        the size whose groups each fit the allowance and bring the most prompt tokens per step (ties: fewer
        steps). Where even one layer at a time passes it, the tokens that take TOKEN_SHARE of the chunk's time."""
        allowed, layers = self._allowed_ms(decodes), self.num_layers
        best, best_rate = 0, 0.0
        for per_step in range(layers, 0, -1):
            count = self._tokens_within(allowed * layers / per_step, context, limit)
            rate = count / math.ceil(layers / per_step)
            if rate > best_rate:
                best, best_rate = count, rate
        floor = self._tokens_within(self._fixed_ms(context) / (1 - TOKEN_SHARE), context, limit)
        return self._record(max(best, floor), limit)

    def layers_per_step(self, decodes: StepWork, context: int, count: int) -> int:
        """How many of the model's layers a chunk of `count` prompt tokens after `context` runs per step beside
        `decodes` (`num_layers`: it runs whole): the most whose share of the chunk fits the allowance, at least one."""
        chunk_ms = self.extra_ms(StepWork().with_chunk(context, count))
        if chunk_ms <= self._allowed_ms(decodes):
            return self.num_layers
        return max(1, min(self.num_layers, int(self._allowed_ms(decodes) * self.num_layers / chunk_ms)))

    def _allowed_ms(self, decodes: StepWork) -> float:
        return (STALL_RATIO - 1) * self.alone_ms(decodes)

    def _fixed_ms(self, context: int) -> float:
        """What any chunk after `context` computed tokens adds before its first token (the context's reread)."""
        a, _, k, _ = self.chunk.theta / CHUNK_SCALE
        return float(a + k * context)

    def _tokens_within(self, allowed: float, context: int, limit: int) -> int:
        """The most tokens (at most `limit`) of a whole chunk after `context` whose predicted extra is <= `allowed`:
        extra(n) = fixed + b n + c (n context + n (n + 1) / 2)."""
        _, b, _, c = self.chunk.theta / CHUNK_SCALE
        linear, spare = b + c * (context + 0.5), allowed - self._fixed_ms(context)
        if spare < 0:
            count = 0
        elif c > 0:
            count = int((-linear + np.sqrt(linear * linear + 2 * c * spare)) / c)
        else:
            count = int(spare / linear) if linear > 0 else max(limit, 0)
        return min(count, max(limit, 0))

    def _record(self, count: int, limit: int) -> int:
        self.last_prefill_tokens = min(max(count, MIN_PREFILL_TOKENS), max(limit, 0))
        return self.last_prefill_tokens

    def describe(self) -> str:
        q0, q1, q2 = self.alone.theta / ALONE_SCALE
        a, b, k, c = self.chunk.theta / CHUNK_SCALE
        return (f"step budget: streams alone {q0:.1f} ms + {q1:.1f} ms per decode row (start-up {self.decode_ms:.1f}) "
                f"+ {q2 * 1e3:.3f} ms per 1k decode context; a prompt chunk adds {a:.1f} ms + {b:.3f} ms/token "
                f"(start-up {self.token_ms:.3f}) + {k * 1e3:.3f} ms per 1k context + {c * 1e3:.4f} ms per 1k attention "
                f"pairs; prompt tokens beside running streams keep a step within {STALL_RATIO:g}x their step alone, "
                f"a chunk split into groups of its {self.num_layers} layers where a whole one would not fit")


def measure(runner: ModelRunner, max_tokens: int) -> StepBudget:
    """The cost model for this model on this machine, seeded by timing a decode and a prompt forward."""
    prompt = max(2, min(PROBE_PROMPT_TOKENS, max_tokens, runner.max_blocks * runner.block_size))
    decode_ms = runner.best_forward_ms(1, 1, PROBE_REPEATS)
    token_ms = max(runner.best_forward_ms(1, prompt, PROBE_REPEATS) - decode_ms, 1e-6) / (prompt - 1)
    budget = StepBudget(decode_ms, token_ms, runner.model.num_layers)
    log.info(budget.describe())
    return budget
