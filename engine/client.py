"""EngineClient: everything the server may use of an engine, as one typed contract.

`AsyncEngine` (the engine in a thread of the server's process) and `ProcessEngineClient` (the engine core
in a process of its own) satisfy it; the server types its engines with it and imports nothing else of the
engine's machinery (no `LLMEngine`, scheduler or model; tests/test_import_graph.py checks), so the HTTP
layer stays independent of how the engine steps. tests/test_engine_client.py holds both clients to it.
`start_engine` is the one place the server's composition root builds an engine; with several API processes
the launcher starts each model's core (`CoreProcess.start`) and each API process `connect_engine`s to it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from engine.config import EngineConfig
from engine.loader.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.process_client import CoreAddress, CoreProcess, ProcessEngineClient
from engine.reports import EngineDescription, EngineStats
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredOutput
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

    def describe(self) -> EngineDescription:
        """What the engine runs on (device, dtype, kernels) and serves, for the start-up banner."""

    def stats(self) -> EngineStats:
        """Counters and gauges for /health, /metrics and model cards; safe from any thread."""

    async def compile_structured(self, spec: StructuredOutput) -> None:
        """Compile (and cache) a structured-output grammar off the event loop and off the step loop;
        GrammarError (engine.errors) if it cannot be used."""

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Stream one request's delta outputs; leaving the iteration early aborts it. Raises EngineDeadError
        when the engine cannot serve, InvalidRequestError for a request it refuses."""

    async def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; returns without waiting for a step."""

    def end_requests(self, reason: str) -> int:
        """End every request in flight with EngineDeadError(reason) (a server's shutdown deadline); how many."""

    async def start(self) -> None:
        """Start stepping (idempotent)."""

    async def shutdown(self) -> None:
        """Stop stepping; running requests end with finish_reason "abort"."""


def start_engine(config: EngineConfig, *, own_process: bool,
                 on_progress: Callable[[int, int], None] | None = None) -> EngineClient:
    """Load `config`'s model: in a core process of its own (`own_process`) or in a thread of this one
    (`on_progress(done, total)` then follows the weights' loading)."""
    if own_process:
        return ProcessEngineClient.from_config(config)
    from engine.async_engine import AsyncEngine

    return AsyncEngine.from_config(config, on_progress=on_progress)


def connect_engine(config: EngineConfig, core: CoreAddress, name: str) -> EngineClient:
    """This API process's client of a core a launcher started; `name` tells it apart from the others."""
    return ProcessEngineClient.connect(config, core, name)


__all__ = ["CoreAddress", "CoreProcess", "EngineClient", "connect_engine", "start_engine"]
