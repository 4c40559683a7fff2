"""AsyncEngine: the LLMEngine steps in its own thread; asyncio handlers talk to it through queues.

vLLM's EngineCore shape, in a thread: the engine thread runs step after step without waiting
for the event loop, so HTTP and SSE work can never sit between two steps; requests are
validated on the caller's side and handed over (like aborts) through a command queue that the
engine thread drains between steps, so neither waits for a step. Each step's outputs go back
to the event loop in one `call_soon_threadsafe`. Only the engine thread touches the LLMEngine's
state after `start()` (`stats()` reads counters).

`from_config` also loads the model on that same thread: every torch operation of a served model
then runs on one thread, so OpenMP keeps one thread pool. A second pool (the model loaded on the
main thread, stepped on another) makes libgomp throttle its spin-waits once its threads outnumber
the cores, which cost SmolLM2 on 2 cores ~25% of its decode throughput (measured: 58-61 vs 72-81
tok/s offline in a second thread vs the loading thread; 85-92 when loaded and run on one worker).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Container
from concurrent.futures import Future
from typing import Any

from engine.config import EngineConfig
from engine.distributed.group import ParallelGroupError
from engine.llm_engine import LLMEngine
from engine.builder import build_engine
from engine.request import Request
from engine.outputs import RequestOutput
from engine.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)

_STOP = object()


class EngineThread:
    """One daemon thread that runs the callables given to `submit`, in order (a daemon, unlike a
    ThreadPoolExecutor's worker, never holds up the interpreter's exit while the step loop waits)."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="minerva-engine", daemon=True).start()

    def submit(self, function: Callable, *args: Any, **kwargs: Any) -> Future:
        done: Future = Future()
        self._work.put((done, function, args, kwargs))
        return done

    def close(self) -> None:
        self._work.put(None)

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            done, function, args, kwargs = item
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function(*args, **kwargs))
                except BaseException as exc:
                    done.set_exception(exc)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (never started, shut down, or crashed)."""


def check_admissible(failure: str | None, running: bool, request_id: str, in_flight: Container[str]) -> None:
    """What every engine client checks before it queues a request: a live, started engine and a request id
    not already in flight."""
    if failure is not None:
        raise EngineDeadError(failure)
    if not running:
        raise EngineDeadError("the engine is not running: call start() first")
    if request_id in in_flight:
        raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, engine_thread: EngineThread | None = None) -> None:
        """`engine_thread`: the thread the engine was built on (its step loop runs there too)."""
        self.engine = engine
        self._engine_thread = engine_thread or EngineThread()
        self._queues: dict[str, asyncio.Queue] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop_done: Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: str | None = None  # why the engine stopped for good (a tensor-parallel rank died)
        self.on_fatal: Callable[[str], None] | None = None  # the server's exit, called once on such a failure

    @classmethod
    def from_config(cls, config: EngineConfig, on_progress: Callable[[int, int], None] | None = None) -> "AsyncEngine":
        engine_thread = EngineThread()
        try:
            engine = engine_thread.submit(build_engine, config, on_progress=on_progress).result()
        except BaseException:
            engine_thread.close()
            raise
        return cls(engine, engine_thread)

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

    @property
    def grammars(self) -> Any:
        """engine.structured.GrammarCompiler: thread-safe, so the server compiles in a worker thread."""
        return self.engine.grammars

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    @property
    def running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    async def start(self) -> None:
        if self.running or self.failure is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._commands = queue.SimpleQueue()
        self._loop_done = self._engine_thread.submit(self._run)

    async def shutdown(self) -> None:
        """Stop the engine thread; every request still running ends with finish_reason "abort"."""
        loop_done, self._loop_done = self._loop_done, None
        if loop_done is not None and not loop_done.done():
            self._commands.put(_STOP)
            await asyncio.wrap_future(loop_done)
        await asyncio.sleep(0)  # the thread's last outputs are delivered first
        for request_queue in self._queues.values():
            request_queue.put_nowait(EngineDeadError("the engine shut down"))
        if self.failure is None:  # after a failure the engine thread closed the model itself
            self.engine.close()
        self._engine_thread.close()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs; leaving the loop early (or being cancelled) aborts it."""
        check_admissible(self.failure, self.running, request_id, self._queues)
        request = self.engine.prepare_request(request_id, prompt, params)  # InvalidRequestError propagates
        request_queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = request_queue
        self._commands.put(request)
        finished = False
        try:
            while not finished:
                item = await request_queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await asyncio.shield(self.abort(request_id))

    def end_requests(self, reason: str) -> int:
        """End every request in flight with EngineDeadError(reason) and abort it in the engine, which keeps
        running (a server's shutdown deadline). Call on the event loop; returns how many were ended."""
        ended = list(self._queues.items())
        self._queues.clear()
        for request_id, request_queue in ended:
            request_queue.put_nowait(EngineDeadError(reason))
            self._commands.put(request_id)
        return len(ended)

    async def abort(self, request_id: str) -> None:
        """Ask the engine thread to drop the request at its next step boundary; returns at once."""
        self._commands.put(request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            request_queue = self._queues.get(output.request_id)
            if request_queue is not None:
                request_queue.put_nowait(output)
                if output.finished:
                    self._queues.pop(output.request_id, None)

    # --- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._apply_commands():
                if not self.engine.has_unfinished():
                    continue
                try:
                    outputs = self.engine.step()
                except ParallelGroupError as exc:
                    self._fail_for_good(str(exc))
                    return
                except Exception:  # the engine fails requests itself; this is a last resort
                    log.exception("engine step crashed")
                    outputs = [self.engine.abort(rid) for rid in list(self.engine.requests)]
                self._send(outputs)
        except Exception:
            log.exception("the engine thread died")
            self._send([self.engine.abort(rid) for rid in list(self.engine.requests)])

    def _fail_for_good(self, reason: str) -> None:
        """Every request in flight gets EngineDeadError (a 503), later ones too; the server is told to exit."""
        log.critical("engine stopped: %s", reason)
        self.failure = reason
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        self._call(self._fail_queues, reason)
        self.engine.close()  # may wait for a stuck rank before killing it
        if self.on_fatal is not None:
            self._call(self.on_fatal, reason)

    def _fail_queues(self, reason: str) -> None:
        for request_queue in self._queues.values():
            request_queue.put_nowait(EngineDeadError(reason))
        self._queues.clear()

    def _apply_commands(self) -> bool:
        """Adds and aborts queued since the last step (waiting for one when idle); False once told to stop."""
        block = not self.engine.has_unfinished()
        outputs = []
        try:
            while True:
                command = self._commands.get(block=block)
                block = False
                if command is _STOP:
                    self._send([self.engine.abort(rid) for rid in list(self.engine.requests)])
                    return False
                if isinstance(command, Request):
                    try:
                        self.engine.add_prepared(command)
                    except InvalidRequestError as exc:
                        self._send_error(command.request_id, exc)
                else:
                    outputs.append(self.engine.abort(command))
        except queue.Empty:
            pass
        self._send([o for o in outputs if o is not None])
        return True

    def _call(self, function: Callable, *args: Any) -> None:
        """Run `function(*args)` on the event loop (it owns the request queues)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _send(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call(self._deliver, outputs)

    def _send_error(self, request_id: str, error: Exception) -> None:
        def put() -> None:
            request_queue = self._queues.pop(request_id, None)
            if request_queue is not None:
                request_queue.put_nowait(error)

        self._call(put)
