"""One engine step (inputs, forward, sampling, outputs) reads the device exactly once.

Tensors that would live on the accelerator are marked with a tensor subclass; everything
computed from them stays marked. Reading a marked tensor on the host (`.item()`, `.tolist()`,
`int()`, `bool()`, `.numpy()`) or copying it to the host is what blocks on a GPU; the test
counts both while real steps run on the CPU path.
"""

from __future__ import annotations

import pytest
import torch

import engine.host_device as host_device
from engine.config import EngineConfig
from engine.builder import engine_for_model
from engine.sampling_params import SamplingParams
from tests.fake_model import IdTokenizer, TensorOpsModel

HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"}


class OnDevice(torch.Tensor):
    """A CPU tensor standing for a device tensor; its host reads and copies to the host are logged."""

    log: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name in ("cpu",) or (name == "to" and _targets_cpu(args[1:], kwargs))
        if name in HOST_READS:
            cls.log.append(name)
        elif to_host or (name == "copy_" and not isinstance(args[0], OnDevice)):
            cls.log.append("device-to-host copy")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
            if to_host:  # on the CPU `.to("cpu")` may hand back the same (marked) tensor
                return result.as_subclass(torch.Tensor)
        return _wrap(result)


def _targets_cpu(args, kwargs) -> bool:
    targets = [a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))]
    return any(torch.device(t).type == "cpu" for t in targets)


def _wrap(value):
    if isinstance(value, torch.Tensor) and not isinstance(value, OnDevice):
        return value.as_subclass(OnDevice)
    if isinstance(value, tuple):
        return type(value)([_wrap(v) for v in value])  # keeps torch.return_types (values, indices)
    return value


SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}


@pytest.mark.parametrize("async_scheduling, speculative", [(False, None), (True, None), (False, SPECULATIVE)],
                         ids=["sync", "async", "speculative"])
def test_a_step_copies_to_the_host_once_and_never_reads_device_tensors(monkeypatch, async_scheduling, speculative):
    real_upload = host_device.upload
    monkeypatch.setattr(host_device, "upload", lambda *a, **kw: _wrap(real_upload(*a, **kw)))
    monkeypatch.setattr("engine.sampler.upload", host_device.upload)
    model = TensorOpsModel(wrap=_wrap)
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, async_scheduling=async_scheduling,
                          speculative_config=speculative)
    engine = engine_for_model(model, IdTokenizer(), config, max_model_len=64, num_blocks=64)
    if engine.spec is not None:  # verify every draft: the cost model would price most of them out
        engine.spec.step_cost = None
    engine.executor.runner.kv_caches[:] = [(_wrap(k), _wrap(v)) for k, v in engine.executor.runner.kv_caches]
    model.bind_kv_caches(engine.executor.runner.kv_caches)
    buffers = engine.executor.runner.buffers
    for name, value in list(vars(buffers).items()):  # the input buffers' device halves
        if isinstance(value, tuple):
            host, array, device = value
            setattr(buffers, name, (host, array, _wrap(device)))
    requests = {
        "greedy": SamplingParams(temperature=0, max_tokens=6),
        "top-p": SamplingParams(temperature=0.9, top_p=0.8, max_tokens=6),
        "top-k min-p": SamplingParams(temperature=1.1, top_k=5, min_p=0.05, max_tokens=6),
        "penalised": SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5, max_tokens=6),
        "logprobs": SamplingParams(temperature=0.7, logprobs=3, max_tokens=6),
        "seeded n=2": SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=6),
        "min tokens": SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5], max_tokens=6),
        "penalised, repeating": SamplingParams(temperature=0, frequency_penalty=-2.0, presence_penalty=-2.0,
                                               max_tokens=6),  # repeats its own tokens: n-gram drafts
    }
    for i, (rid, params) in enumerate(requests.items()):
        engine.add_request(rid, [1 + i, 2, 3, 4, 5, 6, 7][: 3 + i], params)
    steps, drafted = 0, {}
    while engine.has_unfinished():
        OnDevice.log = []
        outputs = engine.step()
        drafted.update((out.request_id, out.num_draft_tokens) for out in outputs)
        # Async scheduling reads a batch back one step later: its first step has nothing to show yet.
        assert outputs or (async_scheduling and steps == 0), "every step of this batch samples"
        launched = engine._in_flight is not None if async_scheduling else True
        assert OnDevice.log == ["device-to-host copy"] * launched, f"step {steps}: {OnDevice.log}"
        steps += 1
    # The second sample of n=2 starts one step late, after the first one's prefill; async needs one more step
    # to read back the last batch (and, at each finish, computes a token it then drops).
    if speculative is None:
        assert steps == 7 + async_scheduling
    else:  # verified drafts (proposed on the host) go through the same single copy, penalised rows' too
        assert engine.spec.stats.num_draft_tokens > 0
        assert drafted["penalised, repeating"] > 0


def test_the_detector_sees_host_reads():
    marked = _wrap(torch.arange(3))
    OnDevice.log = []
    marked.sum().item()
    marked.tolist()
    int(marked[0])
    marked.to("cpu")
    assert OnDevice.log == ["item", "tolist", "__int__", "device-to-host copy"]
