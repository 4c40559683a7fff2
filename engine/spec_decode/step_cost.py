"""What verifying a draft costs this step, so a step only verifies the drafts that pay for themselves.

A forward's time grows with its rows (each new token is a row of every matmul) and with the keys
its rows attend to. Measured at start-up on the served model (CPU): `rows_ms(r)`, a forward of `r`
rows over almost no context, at a few row counts (interpolated between them, so the jump where the
quantized matmuls change kernels is seen), and `key_ms`, each further (row, key) pair of attention,
from one prompt forward. A step of rows R over K (row, key) pairs costs rows_ms(R) + key_ms * K.

Each step `choose` takes drafts greedily by their chance of acceptance (a sequence's per-token
acceptance rate to the power of the draft's position: draft j is emitted only if drafts 1..j all
are) and keeps the prefix that gives the most expected tokens per second; when even the best beats
plain decoding by less than `MIN_GAIN` the step verifies nothing. At one stream a draft row costs
little beside the step's weight reads and most drafts are verified; in a large batch or with a low
acceptance rate few or none are, so speculation costs about nothing there.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass


log = logging.getLogger(__name__)

PROBE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
PROBE_PROMPT = 256  # tokens of the prompt forward that prices attention
MIN_PROBE_PROMPT = 64  # shorter, its fixed costs would drown the keys' (attention then goes unpriced)
PROBE_REPEATS = 2  # best of: a busy machine only slows a forward
MIN_GAIN = 0.02  # expected speed-up below which a step does not speculate (the measurement's noise)


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

    def choose(self, rows: int, row_keys: int, drafts: Sequence[tuple[int, int, float]]) -> list[int]:
        """How many of each sequence's drafts to verify in a step of `rows` rows over `row_keys` pairs, where
        `rows` sequences each emit a token anyway. `drafts[i]` = (drafts proposed, the sequence's context
        length, its per-token acceptance rate)."""
        positions = sorted((-(alpha ** j), j, i) for i, (count, _, alpha) in enumerate(drafts)
                           for j in range(1, count + 1))
        tokens, keys = float(rows), row_keys
        plain = best = tokens / self.ms(rows, keys)
        best_len = 0
        for n, (neg_p, j, i) in enumerate(positions, start=1):
            tokens -= neg_p
            keys += drafts[i][1] + j
            rate = tokens / self.ms(rows + n, keys)
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


def measure(runner, max_rows: int) -> StepCost:
    """Time forwards of the served model on the runner's scratch block (CPU: the forward returns when done).
    `rows` rows are `rows` one-token sequences up to the runner's sequence slots, beyond them sequences of
    several tokens (their few attended keys are subtracted)."""
    capacity = min(max_rows, runner.buffers.input_ids[0].shape[0])
    prompt = min(PROBE_PROMPT, capacity, runner.max_blocks * runner.block_size)
    measured = []
    for wanted in PROBE_ROWS:
        if wanted > capacity:
            break
        seqs = min(wanted, runner.max_num_seqs)
        per_seq = -(-wanted // seqs)
        if seqs * per_seq > capacity:
            break
        measured.append((seqs * per_seq, seqs * per_seq * (per_seq + 1) // 2,
                         runner.best_forward_ms(seqs, per_seq, PROBE_REPEATS)))
    key_ms = 0.0
    if len(measured) > 1 and prompt >= MIN_PROBE_PROMPT:  # a prompt's time beyond as many rows' prices its pairs
        flat = StepCost(tuple(r for r, _, _ in measured), tuple(t for _, _, t in measured), 0.0)
        prompt_ms = runner.best_forward_ms(1, prompt, PROBE_REPEATS)
        key_ms = max(prompt_ms - flat.ms(prompt, 0), 0.0) / (prompt * (prompt + 1) // 2 - prompt)
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
