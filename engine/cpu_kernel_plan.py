"""The CPU kernel plan's int16 row limit, timed on the served model's own forwards, once per process.

kernels/cpu/select.py chooses at start-up up to how many rows int16 activations serve the in-place
quantized matmuls, from a probe on weights that sit in cache, where fp32 activations keep up. A
model's weights stream from memory, and there a forward of 2-4 rows measured ~25% faster in int16
(SmolLM2 Q4_1, one thread: 4 rows 22.6 vs 30.4 ms), while the probe left them at one row in some
runs and at 8 in others under load. So the builder of every CPU engine times the model's forwards at
2, 4, 6 and 8 rows with int16 serving up to that count and up to one row fewer, and keeps the largest
count up to which int16 was never slower (on SmolLM2 that is 6: 5 rows 32.5 vs 36.7 ms, 6 rows 36.6 vs
39.2, 8 rows 44.4 vs 42.5; a verify step at one or four streams has 5-8 rows). Batched decode, prompt chunks and verification rows all run
at these sizes. The plan is the process's: the first engine built decides and later ones keep it.
"""

from __future__ import annotations

import logging

from engine.model_runner import ModelRunner
from kernels.cpu import select

log = logging.getLogger(__name__)

INT_DOT_ROWS = (2, 4, 6, 8)  # row counts where int16 activations are timed against fp32 on the served model
ROUNDS = 3  # every shape is timed once per round and keeps its best: a burst of load cannot decide a comparison alone


def calibrate_int_dot(runner: ModelRunner, max_rows: int) -> None:
    """Time the served model at INT_DOT_ROWS (up to `max_rows`) and set the plan's int16 limit from it."""
    plan = select.chosen()
    if plan is None or not plan.int_dot_max_rows or plan.int_dot_timed_on_model:
        return  # no quantized weights, int16 off or slower at one row, or an engine built before decided
    counts = [rows for rows in INT_DOT_ROWS if rows <= max_rows]
    best = {(rows, limit): float("inf") for rows in counts for limit in (rows, rows - 1)}
    for _ in range(ROUNDS):
        for rows, limit in best:
            select.set_int_dot_max_rows(limit)
            best[rows, limit] = min(best[rows, limit], runner.best_forward_ms(1, rows, 1))
    serving = 1
    for rows in counts:
        if best[rows, rows] > best[rows, rows - 1]:
            break
        serving = rows
    select.set_int_dot_max_rows(serving, timed_on_model=True)
    log.info("CPU matmul: int16 activations up to %d rows, timed on the served model (the probe chose %d)",
             serving, plan.int_dot_max_rows)
