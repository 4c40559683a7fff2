"""What verifying a draft costs this step, so a step only verifies the drafts that pay for themselves.

A forward's time grows with its rows (each new token is a row of every matmul) and with the keys
its rows attend to. Measured at start-up on the served model (CPU): `rows_ms(r)`, a forward of `r`
rows over almost no context, at a few row counts (interpolated between them, so the jump where the
quantized matmuls change kernels is seen), and `key_ms`, each further (row, key) pair of attention,
from one prompt forward. A step of rows R over K (row, key) pairs costs rows_ms(R) + key_ms * K.

Each step `choose` takes drafts greedily by their chance of acceptance (draft j is emitted only if
drafts 1..j all are: a sequence's first-draft acceptance rate times its later-draft rate to the power
j - 1, adaptive.py) and keeps the prefix that gives the most expected tokens per second; when even the
best beats plain decoding by less than `MIN_GAIN` the step verifies nothing. At one stream a draft row
costs little beside the step's weight reads and most drafts are verified; in a large batch or with a
low acceptance rate few or none are, so speculation costs about nothing there. `StepScale` follows how
the served steps compare with these start-up prices, verifying steps against plain ones.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 128)  # dense where drafts are verified at one stream
PROBE_PROMPT = 256  # tokens of the prompt forward that prices attention
MIN_PROBE_PROMPT = 64  # shorter, its fixed costs would drown the keys' (attention then goes unpriced)
PROBE_ROUNDS = 3  # every probed shape is timed once per round and keeps its best: a busy machine only slows a forward
MIN_GAIN = 0.1  # expected speed-up below which a step does not speculate (the estimates' noise: bench/spec_decode.py)
SCALE_WEIGHT = 0.1  # weight of the newest step in StepScale's averages
SCALE_BOUND = 3.0  # a step's observed / predicted time counts within this factor of plain steps': a stall is not the step's


@dataclass(frozen=True)
class StepCost:
    rows: tuple[int, ...]  # measured row counts, ascending
    rows_ms: tuple[float, ...]  # forward time at each (non-decreasing)
    key_ms: float  # each further (row, key) pair of attention

    def ms(self, rows: int, row_keys: int) -> float:
        """A forward of `rows` rows attending to `row_keys` (row, key) pairs in all."""
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows) and self.rows[i] == rows:
            base = self.rows_ms[i]
        else:  # between two measured counts (or past the last: along its last segment)
            lo = min(max(i - 1, 0), len(self.rows) - 2)
            r0, r1, t0, t1 = self.rows[lo], self.rows[lo + 1], self.rows_ms[lo], self.rows_ms[lo + 1]
            base = max(t0 + (t1 - t0) * (rows - r0) / (r1 - r0), self.rows_ms[0])
        return base + self.key_ms * row_keys

    def choose(self, rows: int, row_keys: int, drafts: Sequence[tuple[int, int, float, float]],
               verify_scale: float = 1.0) -> list[int]:
        """How many of each sequence's drafts to verify in a step of `rows` rows over `row_keys` pairs, where
        `rows` sequences each emit a token anyway. `drafts[i]` = (drafts proposed, the sequence's context
        length, its first-draft and later-draft acceptance rates: adaptive.py); a step that verifies is priced
        `verify_scale` times its measured cost (StepScale: how much slower verifying steps run than predicted,
        against plain ones)."""
        positions = sorted((-first * later ** (j - 1), j, i) for i, (count, _, first, later) in enumerate(drafts)
                           for j in range(1, count + 1))
        tokens, keys = float(rows), row_keys
        plain = best = tokens / self.ms(rows, keys)
        best_len = 0
        for n, (neg_p, j, i) in enumerate(positions, start=1):
            tokens -= neg_p
            keys += drafts[i][1] + j
            rate = tokens / (self.ms(rows + n, keys) * verify_scale)
            if rate > best:
                best, best_len = rate, n
        counts = [0] * len(drafts)
        if best >= plain * (1 + MIN_GAIN):
            for _, j, i in positions[:best_len]:
                counts[i] = max(counts[i], j)
        return counts

    def describe(self) -> str:
        points = ", ".join(f"{r}: {t:.1f}" for r, t in zip(self.rows, self.rows_ms))
        return f"speculation step cost: forward ms by rows {{{points}}}, {self.key_ms * 1e3:.3f} us per attended key"


@dataclass
class StepScale:
    """How verifying steps' times compare with the start-up prediction against how plain steps' do, learnt from
    every decode-only step. The probe times one-token decodes; a verifying step also attends from several
    query positions, samples every row and emits its tokens one at a time, while what moves every step alike
    (a thread count changed since start-up, other load) moves no choice."""

    plain: float | None = None  # moving average of observed / predicted time, steps without drafts
    relative: float = 1.0  # ... of a verifying step's observed / predicted time over `plain`

    def observe(self, cost: StepCost, rows: int, row_keys: int, verifying: bool, ms: float) -> None:
        ratio = ms / cost.ms(rows, row_keys)
        if self.plain is None:
            if not verifying:
                self.plain = ratio
            return
        ratio = min(max(ratio, self.plain / SCALE_BOUND), self.plain * SCALE_BOUND)
        if verifying:
            self.relative += SCALE_WEIGHT * (ratio / self.plain - self.relative)
        else:
            self.plain += SCALE_WEIGHT * (ratio - self.plain)


def measure(runner: ModelRunner, max_rows: int) -> StepCost:
    """Time forwards of the served model on the runner's scratch block (CPU: the forward returns when done).
    `rows` rows are `rows` one-token sequences up to the runner's sequence slots, beyond them sequences of
    several tokens (their few attended keys are subtracted). Every shape is timed once per round and keeps
    its best: a burst of other load then slows one round of all shapes, not all rounds of a few."""
    capacity = min(max_rows, runner.buffers.input_ids[0].shape[0])
    prompt = min(PROBE_PROMPT, capacity, runner.max_blocks * runner.block_size)
    shapes = []  # (sequences, tokens each)
    for wanted in PROBE_ROWS:
        seqs = min(wanted, runner.max_num_seqs)
        per_seq = -(-wanted // seqs)
        if wanted > capacity or seqs * per_seq > capacity:
            break
        if (seqs, per_seq) not in shapes:  # with few sequence slots, several wanted counts round to one shape
            shapes.append((seqs, per_seq))
    priced = len(shapes) > 1 and prompt >= MIN_PROBE_PROMPT  # a prompt's time beyond as many rows' prices its pairs
    timed = shapes + [(1, prompt)] if priced else shapes
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(PROBE_ROUNDS):
        for shape in timed:
            best[shape] = min(best[shape], runner.best_forward_ms(*shape, 1))
    measured = [(seqs * per_seq, seqs * per_seq * (per_seq + 1) // 2, best[seqs, per_seq]) for seqs, per_seq in shapes]
    key_ms = 0.0
    if priced:
        flat = StepCost(tuple(r for r, _, _ in measured), tuple(t for _, _, t in measured), 0.0)
        key_ms = max(best[1, prompt] - flat.ms(prompt, 0), 0.0) / (prompt * (prompt + 1) // 2 - prompt)
    rows_ms: list[float] = []
    rows: list[int] = []
    for count, keys, ms in measured:
        ms = max(ms - key_ms * (keys - count), rows_ms[-1] if rows_ms else 0.0)  # noise never makes more rows cheaper
        rows.append(count)
        rows_ms.append(ms)
    if len(rows) == 1:  # a runner with one token of room: nothing to interpolate (and nothing to verify)
        rows.append(rows[0] + 1)
        rows_ms.append(rows_ms[0])
    cost = StepCost(tuple(rows), tuple(rows_ms), key_ms)
    log.info(cost.describe())
    return cost
