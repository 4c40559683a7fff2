"""Shared helpers for the engine tests: a tiny real Llama, a transformers greedy reference, invariants."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.builder import build_engine
from engine.outputs import RequestAccumulator, RequestOutput


@functools.lru_cache(maxsize=1)
def tiny_llama_dir() -> Path:
    import tempfile

    from tests.server_fixtures import save_tiny_llama

    return save_tiny_llama(Path(tempfile.mkdtemp(prefix="minerva-engine-")) / "tiny-llama")


def make_engine(num_blocks: int | None = None, **overrides) -> LLMEngine:
    config = EngineConfig(model=str(tiny_llama_dir()), **{"kv_cache_gib": 0.01, **overrides})
    return build_engine(config, num_blocks=num_blocks)


@functools.lru_cache(maxsize=64)
def reference_greedy(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """Greedy continuation by transformers' own LlamaForCausalLM, full forward per token."""
    model = _hf_model()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@functools.lru_cache(maxsize=1)
def _hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir()).eval()


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Step until idle; each request's deltas merged into its whole completion."""
    merged: dict[str, RequestAccumulator] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for output in engine.step():
            accumulator = merged.setdefault(output.request_id, RequestAccumulator())
            assert not accumulator.finished, "output after the request finished"
            accumulator.add(output)
    assert not engine.has_unfinished(), "engine did not finish"
    return {rid: acc.result(rid) for rid, acc in merged.items() if acc.finished}


def assert_idle(engine: LLMEngine) -> None:
    """All blocks free, no request left anywhere."""
    assert engine.pool.num_free == engine.pool.num_blocks
    assert all(count == 0 for count in engine.pool.ref_counts)
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests
