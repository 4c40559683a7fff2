"""The executor seam: LLMEngine runs every step through `Executor.execute`, asks it for health, KV bytes and
kernels, and shuts it down on close, whatever kind it holds (one process or a tensor-parallel group)."""

from __future__ import annotations

import pytest

import kernels.reference
from engine.builder import engine_for_model
from engine.config import EngineConfig
from engine.errors import ParallelGroupError
from engine.executor import SingleProcessExecutor
from engine.sampling_params import SamplingParams
from tests.engine_testing import run_to_completion
from tests.fake_model import FakeModel, IdTokenizer


class CountingExecutor(SingleProcessExecutor):
    """One process, counting forwards and shutdowns; `broken` fails every step as a lost rank would."""

    def __init__(self, runner, ops=None) -> None:
        super().__init__(runner, ops)
        self.forwards = self.shutdowns = 0
        self.broken = False

    def forward(self, inputs):
        self.check_health()
        self.forwards += 1
        return super().forward(inputs)

    def check_health(self) -> None:
        if self.broken:
            raise ParallelGroupError("rank 1 exited")

    def shutdown(self) -> None:
        self.shutdowns += 1


def counting_engine():
    engine = engine_for_model(FakeModel(), IdTokenizer(), EngineConfig(block_size=4), max_model_len=64,
                              num_blocks=32, ops=kernels.reference)
    engine.executor = CountingExecutor(engine.executor.runner, kernels.reference)
    return engine


def test_the_engine_steps_reports_and_closes_through_its_executor():
    engine = counting_engine()
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finals = run_to_completion(engine)
    assert len(finals["a"].outputs[0].token_ids) == 4 and engine.executor.forwards == 4
    stats = engine.stats()
    assert stats.kernels == {"backend": "torch"} and stats.tensor_parallel_size == 1
    assert stats.kv_cache_bytes == engine.executor.kv_cache_bytes() > 0
    engine.close()
    assert engine.executor.shutdowns == 1


def test_a_failing_group_stops_the_engine_instead_of_failing_one_request():
    engine = counting_engine()
    engine.executor.broken = True
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(ParallelGroupError):
        engine.step()
