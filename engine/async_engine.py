"""AsyncEngine: one background asyncio task owns the LLMEngine and feeds per-request output queues.

The blocking `step()` runs in a worker thread (`asyncio.to_thread`), so the event loop keeps
serving HTTP while the model computes. All engine calls happen on that one loop task or under
its lock, so the LLMEngine never sees two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.config import EngineConfig
from engine.distributed.group import ParallelGroupError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (never started, shut down, or crashed)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.failure: str | None = None  # why the engine stopped for good (a tensor-parallel rank died)
        self.on_fatal: Callable[[str], None] | None = None  # the server's exit, called once on such a failure

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine.from_config(config))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_info(self) -> Any:
        return self.engine.model_info

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def start(self) -> None:
        if self.failure is None and (self._task is None or self._task.done()):
            self._lock = asyncio.Lock()
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="minerva-engine-loop")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        async with self._lock:
            for request_id in list(self.engine.requests):
                self._deliver(self.engine.abort(request_id))
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError("the engine shut down"))
        self.engine.close()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs; leaving the loop early (or being cancelled) aborts it."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if self._task is None or self._task.done():
            raise EngineDeadError("the engine is not running: call start() first")
        queue: asyncio.Queue = asyncio.Queue()
        async with self._lock:
            self.engine.add_request(request_id, prompt, params)  # InvalidRequestError propagates
            self._queues[request_id] = queue
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        async with self._lock:
            output = self.engine.abort(request_id)
        if output is not None:
            self._deliver(output)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        queue = self._queues.get(output.request_id)
        if queue is not None:
            queue.put_nowait(output)
            if output.finished:
                self._queues.pop(output.request_id, None)

    async def _loop(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                try:
                    outputs = await asyncio.to_thread(self.engine.step)
                except ParallelGroupError as exc:
                    await self._fail_for_good(str(exc))
                    return
                except Exception:  # the engine fails requests itself; this is a last resort
                    log.exception("engine step crashed")
                    outputs = [self.engine.abort(rid) for rid in list(self.engine.requests)]
            for output in outputs:
                self._deliver(output)
            await asyncio.sleep(0)  # let handlers add and abort between steps

    async def _fail_for_good(self, reason: str) -> None:
        """Every request in flight gets EngineDeadError (a 503), later ones too; the server is told to exit."""
        log.critical("engine stopped: %s", reason)
        self.failure = reason
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(reason))
        self._queues.clear()
        await asyncio.to_thread(self.engine.close)  # may wait for a stuck rank before killing it
        if self.on_fatal is not None:
            self.on_fatal(reason)
