"""engine/builder.py resolves every "auto" of the config once: device, dtype, kernel backend (from the
config alone: no environment variable overrides it), the KV cache's dtype, and hands LLMEngine what it sized."""

from __future__ import annotations

import pytest
import torch

from engine.builder import Placement, engine_for_model, kv_cache_dtype, resolve_device
from engine.config import EngineConfig
from engine.errors import ConfigError
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


def test_kv_cache_dtype_auto_is_fp16_where_the_cpu_kernels_read_it():
    from kernels.cpu import extension

    cpu = Placement.resolve(EngineConfig(device="cpu"))
    native = extension.load()
    flash = native is not None and 64 in native.flash_head_dims()
    assert kv_cache_dtype(EngineConfig(device="cpu"), cpu, 64) == (torch.float16 if flash else torch.float32)
    assert kv_cache_dtype(EngineConfig(device="cpu"), cpu, 48) == torch.float32  # no flash kernel for 48
    reference = Placement.resolve(EngineConfig(device="cpu", kernel_backend="torch"))
    assert kv_cache_dtype(EngineConfig(device="cpu", kernel_backend="torch"), reference, 64) == torch.float32
    explicit = EngineConfig(device="cpu", kv_cache_dtype="bfloat16")
    assert kv_cache_dtype(explicit, cpu, 48) == torch.bfloat16


@pytest.mark.parametrize("overrides", [dict(kernel_backend="torch"), dict(tensor_parallel_size=2)])
def test_kv_cache_dtype_other_than_dtype_only_on_the_cpu_backend(overrides):
    config = EngineConfig(device="cpu", kv_cache_dtype="float16", **overrides)
    with pytest.raises(ConfigError, match="kv_cache_dtype float16 differs"):
        kv_cache_dtype(config, Placement.resolve(config), 64)
    same = EngineConfig(device="cpu", kv_cache_dtype="float32", **overrides)
    assert kv_cache_dtype(same, Placement.resolve(same), 64) == torch.float32


def test_a_built_engine_stores_and_reports_the_chosen_kv_cache_dtype():
    from engine.async_engine import describe
    from engine.builder import build_engine
    from engine.sampling_params import SamplingParams
    from tests.engine_testing import tiny_llama_dir

    engines = {dtype: build_engine(EngineConfig(model=str(tiny_llama_dir()), device="cpu", kv_cache_gib=0.01,
                                                kv_cache_dtype=dtype)) for dtype in ("float32", "bfloat16")}
    narrow = engines["bfloat16"]
    assert {k.dtype for pair in narrow.executor.runner.kv_caches for k in pair} == {torch.bfloat16}
    assert describe(narrow).kv_cache_dtype == "bfloat16" and describe(engines["float32"]).kv_cache_dtype == "float32"
    assert narrow.pool.num_blocks >= 2 * engines["float32"].pool.num_blocks  # the same GiB hold twice the tokens
    for engine in engines.values():
        engine.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
