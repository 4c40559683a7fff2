"""The padded static-buffer path (what CUDA graphs replay) computes what the unpadded path computes.

On CPU the padded path runs eagerly: decode-only batches are padded to a bucket size, padded rows
write to the scratch KV block and attend to it alone, block tables span the full width. Greedy
tokens must be identical and logits equal to float tolerance, with chunked prefill and preemption.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.builder import engine_for_model
from engine.model_runner import decode_buckets
from engine.sampling_params import SamplingParams
from tests.engine_testing import assert_idle
from tests.fake_model import IdTokenizer

PROMPTS = [[5 + i, 17, 3 * i + 1, 40, 9, 11 + i, 7, 60 + i, 2 + i][: 3 + 2 * i] for i in range(5)]


@functools.lru_cache(maxsize=None)
def _model_dir(kind: str) -> Path:
    from tests.model_factories import save_tiny_model

    path = Path(tempfile.mkdtemp(prefix=f"minerva-static-{kind}-"))
    save_tiny_model(kind, path)
    return path


class LogitsRecorder:
    """Wraps the sampler: keeps a copy of each step's logits."""

    def __init__(self, sampler) -> None:
        self.sampler, self.logits = sampler, []

    def __call__(self, logits, rows, **kwargs):
        self.logits.append(logits.clone())
        return self.sampler(logits, rows, **kwargs)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


@functools.lru_cache(maxsize=None)
def _model(kind: str):
    from engine.loader import open_model
    from engine.models import build_model
    from kernels import select_ops

    return build_model(open_model(str(_model_dir(kind))), device=torch.device("cpu"), dtype=torch.float32,
                       ops=select_ops("cpu"))


def _run(kind: str, padded: bool, **config) -> tuple[dict[str, list[int]], list[torch.Tensor], list[int], int]:
    """Tokens per request, logits per step, the padding rows each step added, preemptions."""
    model = _model(kind)
    num_blocks = config.pop("num_blocks")
    engine = engine_for_model(model, IdTokenizer(), EngineConfig(max_num_seqs=8, **config), max_model_len=24,
                       num_blocks=num_blocks)
    if padded:
        engine.executor.runner.buckets = decode_buckets(engine.scheduler.max_num_seqs)
    recorder = LogitsRecorder(engine.executor.runner.sampler)
    engine.executor.runner.sampler = recorder
    padding, prepare = [], engine.executor.runner.prepare

    def prepare_and_note(step):
        inputs = prepare(step)
        rows = len(step.scheduled_seq_ids)
        padding.append((inputs.decode_bucket or rows) - rows)
        return inputs

    engine.executor.runner.prepare = prepare_and_note
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t for o in out.outputs for t in o.token_ids)
    assert_idle(engine)
    return tokens, recorder.logits, padding, engine.scheduler.num_preemptions


@pytest.mark.parametrize("kind", ["llama", "gpt_oss"])
@pytest.mark.parametrize("config", [
    dict(num_blocks=64, block_size=4, max_num_batched_tokens=64),
    dict(num_blocks=64, block_size=4, max_num_batched_tokens=6),  # chunked prefill
    dict(num_blocks=12, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False),  # preemption
], ids=["plain", "chunked", "preempting"])
def test_padded_static_path_equals_the_unpadded_path(kind, config):
    dynamic_tokens, dynamic_logits, no_padding, _ = _run(kind, False, **dict(config))
    static_tokens, static_logits, padding, preemptions = _run(kind, True, **dict(config))
    assert not any(no_padding) and any(padding)
    assert static_tokens == dynamic_tokens
    assert len(static_logits) == len(dynamic_logits)
    for padded, plain in zip(static_logits, dynamic_logits):
        torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)  # batch shape moves matmul rounding
    if config["num_blocks"] == 12:
        assert preemptions > 0


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager_on_the_gpu():
    from tests.engine_testing import make_engine

    texts = ["The quick brown fox", "Hello", "Paged attention keeps the key value cache in fixed size blocks."]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = []
    for eager in (True, False):
        engine = make_engine(device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=8)
        assert (engine.executor.runner.graphs is None) == eager
        replays = []
        if not eager:
            replay = engine.executor.runner.graphs.replay
            engine.executor.runner.graphs.replay = lambda bucket: replays.append(bucket) or replay(bucket)
        for i, text in enumerate(texts):
            engine.add_request(str(i), text, params)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(t for o in out.outputs for t in o.token_ids)
        assert_idle(engine)
        assert eager or replays, "decode steps replayed a graph"
        results.append(tokens)
    assert results[0] == results[1]
