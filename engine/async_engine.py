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
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from typing import ParamSpec, TypeVar

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, ParallelGroupError
from engine.llm_engine import LLMEngine
from engine.builder import build_engine
from engine.loader.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.reports import EngineDescription, EngineStats
from engine.request import Request
from engine.request_streams import RequestStreams
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredOutput
from engine.tokenizer import Tokenizer

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger(__name__)


class _Stop:
    """The command that stops the engine thread's loop (its one instance is _STOP)."""


_STOP = _Stop()


class EngineThread:
    """One daemon thread that runs the callables given to `submit`, in order (a daemon, unlike a
    ThreadPoolExecutor's worker, never holds up the interpreter's exit while the step loop waits)."""

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="minerva-engine", daemon=True).start()

    def submit(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        done: Future[T] = Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function(*args, **kwargs))
                except BaseException as exc:
                    done.set_exception(exc)

        self._work.put(run)
        return done

    def close(self) -> None:
        self._work.put(None)

    def _serve(self) -> None:
        while (run := self._work.get()) is not None:
            run()


def abort_all(engine: LLMEngine) -> list[RequestOutput]:
    """End every request the engine holds (finish_reason "abort"), freeing their blocks; their last outputs."""
    return [output for rid in list(engine.requests) if (output := engine.abort(rid)) is not None]


def describe(engine: LLMEngine) -> EngineDescription:
    """The start-up banner's facts of a built engine."""
    model, kernels = engine.model, engine.executor.kernels()  # tensor parallel: rank 0's slice, as every rank's
    return EngineDescription(max_model_len=engine.max_model_len, vocab_size=model.vocab_size,
                             device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
                             kv_cache_dtype=str(model.kv_cache_dtype).removeprefix("torch."),
                             kernels=str(kernels["backend"]) if kernels is not None else "none")


class AsyncEngine(RequestStreams):
    def __init__(self, engine: LLMEngine, engine_thread: EngineThread | None = None) -> None:
        """`engine_thread`: the thread the engine was built on (its step loop runs there too)."""
        super().__init__()
        self.engine = engine
        self._engine_thread = engine_thread or EngineThread()
        self._commands: queue.SimpleQueue[Request | str | _Stop] = queue.SimpleQueue()  # adds, aborts (ids), _STOP
        self._loop_done: Future[None] | None = None

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
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_info(self) -> ModelInfo:
        info = self.engine.model_info
        if info is None:  # an engine built around a model object (engine_for_model) has no loader metadata
            raise RuntimeError("this engine has no model metadata: build it from a model path, or pass "
                               "engine_for_model a model_info")
        return info

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def describe(self) -> EngineDescription:
        return describe(self.engine)

    async def compile_structured(self, spec: StructuredOutput) -> None:
        """Compiled in a grammar worker process (the step loop then finds it cached); GrammarError if it cannot be."""
        await self.engine.grammars.compile_async(spec)

    def stats(self) -> EngineStats:
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
        self._fail_all("the engine shut down")
        if self.failure is None:  # after a failure the engine thread closed the model itself
            self.engine.close()
        self._engine_thread.close()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Stream this request's outputs; leaving the loop early (or being cancelled) aborts it."""
        slot = self._open(request_id)
        try:
            request = self.engine.prepare_request(request_id, prompt, params)  # InvalidRequestError propagates
        except BaseException:
            self._forget(request_id)
            raise
        self._commands.put(request)
        async for output in self._stream(request_id, slot):
            yield output

    def _send_aborts(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._commands.put(request_id)

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
                    outputs = abort_all(self.engine)
                self._send(outputs)
        except Exception:
            log.exception("the engine thread died")
            self._send(abort_all(self.engine))

    def _fail_for_good(self, reason: str) -> None:
        """Every request in flight gets EngineDeadError (a 503), later ones too; the server is told to exit."""
        log.critical("engine stopped: %s", reason)
        self.failure = reason  # set here, at once: generate() refuses new requests from now on
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        self._call(self._stopped_for_good, reason)
        self.engine.close()  # may wait for a stuck rank before killing it

    def _apply_commands(self) -> bool:
        """Adds and aborts queued since the last step (waiting for one when idle); False once told to stop."""
        block = not self.engine.has_unfinished()
        outputs = []
        try:
            while True:
                command = self._commands.get(block=block)
                block = False
                if isinstance(command, _Stop):
                    self._send(abort_all(self.engine))
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

    def _send(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call(self._deliver, outputs)

    def _send_error(self, request_id: str, error: Exception) -> None:
        self._call(self._fail, request_id, error)
