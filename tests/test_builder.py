"""engine/builder.py resolves every "auto" of the config once: device, dtype, kernel backend (from the
config alone: no environment variable overrides it) and hands LLMEngine what it sized."""

from __future__ import annotations

import pytest
import torch

from engine.builder import Placement, engine_for_model, resolve_device
from engine.config import EngineConfig
from kernels import resolve_backend
from tests.fake_model import FakeModel, IdTokenizer


def test_auto_resolves_by_device_and_explicit_values_stand(monkeypatch):
    monkeypatch.setenv("MINERVA_BACKEND", "torch")  # once an override of "auto"; now nothing reads it
    placement = Placement.resolve(EngineConfig(device="cpu"))
    assert placement == Placement(torch.device("cpu"), torch.float32, "cpu", 1)
    chosen = Placement.resolve(EngineConfig(device="cpu", dtype="bfloat16", kernel_backend="torch"))
    assert (chosen.dtype, chosen.kernel_backend) == (torch.bfloat16, "torch")
    assert resolve_backend("cuda") == "triton" and resolve_backend("cpu", "triton") == "triton"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cpu", "tpu")


def test_engine_for_model_sizes_the_engine_it_hands_over():
    engine = engine_for_model(FakeModel(), IdTokenizer(), EngineConfig(block_size=4), max_model_len=64,
                              num_blocks=10)
    assert engine.max_model_len == 40  # the model's 64 do not fit 10 blocks of 4: the context is fitted
    assert engine.pool.num_blocks == 10 and engine.scheduler.max_num_seqs == 128  # CPU's default
    assert not engine.async_scheduling and engine.stats().tensor_parallel_size == 1
