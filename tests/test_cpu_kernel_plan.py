"""The CPU kernel plan's int16 row limit, timed on the served model (engine/cpu_kernel_plan.py)."""

from __future__ import annotations

import pytest
import torch

from engine import builder
from engine.cpu_kernel_plan import calibrate_int_dot
from kernels.cpu import extension, select
from kernels.cpu.quant import pack_gguf
from tests.engine_testing import make_engine


class IntDotTimedRunner:
    """Forward times as the plan's int16 limit makes them: int16 rows cost `int_ms`, fp32 ones `exact_ms` each."""

    def __init__(self, int_ms: dict[int, float], exact_ms: float) -> None:
        self.int_ms, self.exact_ms = int_ms, exact_ms

    def best_forward_ms(self, num_seqs: int, tokens_per_seq: int, repeats: int) -> float:
        rows = num_seqs * tokens_per_seq
        return self.int_ms[rows] if rows <= select.plan().int_dot_max_rows else self.exact_ms * rows


@pytest.mark.parametrize("planned, int_ms, expected", [
    (1, {2: 10.0, 4: 20.0, 6: 30.0, 8: 50.0}, 6),  # the probe left int16 at one row; the model's forwards say up to 6
    (8, {2: 10.0, 4: 50.0, 6: 30.0, 8: 40.0}, 2),  # ... and past 2 they are slower: fp32 from 3 rows
    (0, {2: 1.0, 4: 1.0, 6: 1.0, 8: 1.0}, 0),  # int16 off (or slower at one row): never timed, stays off
])
def test_int16_serves_the_row_counts_where_the_model_runs_faster_with_it(monkeypatch, planned, int_ms, expected):
    monkeypatch.setattr(select, "_plan", [select.Plan("qgemm", 16, ("Q4_1",), "test", int_dot_max_rows=planned)])
    calibrate_int_dot(IntDotTimedRunner(int_ms, exact_ms=6.0), max_rows=64)
    assert select.plan().int_dot_max_rows == expected
    assert select.plan().int_dot_timed_on_model == bool(planned)


def test_the_first_engine_of_a_process_decides(monkeypatch):
    monkeypatch.setattr(select, "_plan", [select.Plan("qgemm", 16, ("Q4_1",), "test", int_dot_max_rows=1)])
    calibrate_int_dot(IntDotTimedRunner({2: 10.0, 4: 20.0, 6: 30.0, 8: 50.0}, exact_ms=6.0), max_rows=64)
    calibrate_int_dot(IntDotTimedRunner({2: 99.0, 4: 99.0, 6: 99.0, 8: 99.0}, exact_ms=6.0), max_rows=64)
    assert select.plan().int_dot_max_rows == 6


def test_every_cpu_engine_times_int16_rows_on_its_model(monkeypatch):
    """Not only engines that speculate: the limit serves batched decode and prompt chunks too."""
    monkeypatch.setattr(select, "_plan", [select.Plan("qgemm", 16, ("Q4_1",), "test", int_dot_max_rows=1)])
    timed = []
    monkeypatch.setattr(builder, "calibrate_int_dot", lambda runner, max_rows: timed.append(max_rows))
    engine = make_engine()
    assert engine.spec is None and timed == [engine.config.batched_tokens]


def test_int16_rows_are_computed_alone_so_a_verified_step_matches_a_plain_one():
    """Why int16 may serve verification rows without moving greedy output: each row's result is bit for bit the
    one it gets as a single-row decode, whatever rows share its batch."""
    ops = extension.load()
    if ops is None or not ops.has_int_dot():
        pytest.skip("no integer CPU kernels here")
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (96, 576 // 32 * 20), dtype=torch.uint8, generator=generator).view(-1, 20)
    raw[:, :4] = torch.full((raw.shape[0], 2), 0.01, dtype=torch.float16).view(torch.uint8)
    weight = pack_gguf(raw, "Q4_1", (96, 576))
    x = torch.randn(9, 576, generator=generator)
    alone = torch.cat([select.int_linear(x[i:i + 1].contiguous(), weight) for i in range(9)])
    for rows in range(2, 10):
        assert torch.equal(select.int_linear(x[:rows].contiguous(), weight), alone[:rows])
