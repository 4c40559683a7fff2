"""EngineClient: everything the server may use of an engine, as one typed contract.

`AsyncEngine` satisfies it; the server types its engines with it and reaches nothing else
(no `LLMEngine`, scheduler or model), so the HTTP layer stays independent of how the engine
steps (a thread today, a process like vLLM's EngineCore tomorrow). tests/test_engine_client.py
holds AsyncEngine to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from engine.loader.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


class EngineClient(Protocol):
    failure: str | None  # why the engine stopped for good (None while it can serve)
    on_fatal: Callable[[str], None] | None  # called once when the engine stops for good

    @property
    def tokenizer(self) -> Tokenizer:
        """Chat templates, encode/decode for the routes that need text before the engine does."""

    @property
    def model_info(self) -> ModelInfo:
        """The loader's metadata (architecture, vocab, context, file facts) for model cards and routes."""

    @property
    def max_model_len(self) -> int:
        """The context length this engine serves (fitted to its KV budget)."""

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for /health, /metrics and model cards; safe from any thread."""

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one request's delta outputs; leaving the iteration early aborts it."""

    async def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; returns without waiting for a step."""

    async def start(self) -> None:
        """Start stepping (idempotent)."""

    async def shutdown(self) -> None:
        """Stop stepping; running requests end with finish_reason "abort"."""
