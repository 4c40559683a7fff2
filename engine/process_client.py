"""ProcessEngineClient: the EngineClient of an engine core running in its own process (engine/core_process.py).

The API server keeps what its routes need before the engine does (the tokenizer, the model's metadata,
a grammar compiler to refuse bad schemas) and sends everything else over ZeroMQ: requests and aborts
out, batched outputs, refusals and stats back. One daemon thread receives, decodes and hands each
batch to the event loop in one `call_soon_threadsafe`, and watches the core through a pidfd: if the
core dies, every open stream ends with EngineDeadError and `on_fatal` tells the server to exit.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq

from engine import wire
from engine.async_engine import EngineDeadError, check_admissible
from engine.config import EngineConfig
from engine.errors import MinervaError
from engine.loader.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.structured import GrammarCompiler
from engine.tokenizer import Tokenizer

SHUTDOWN_TIMEOUT_S = 30.0  # the core finishes its step and closes the model; then it is killed


class EngineCoreError(MinervaError):
    """The engine core process could not build the engine (its message says why)."""


class ProcessEngineClient:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, model_info: ModelInfo) -> None:
        """Starts the core process; `wait_ready` then waits for its engine to be built."""
        self.config = config
        self._tokenizer = tokenizer
        self._model_info = model_info
        self.failure: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.description: wire.EngineDescription | None = None
        self._stats: dict[str, Any] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._prompts: dict[str, list[int]] = {}  # request id -> prompt ids (sent once by the core; wire.Outputs)
        self._grammars: GrammarCompiler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: threading.Thread | None = None
        self._closing = threading.Event()  # the receiver thread stops
        self._shutting_down = False  # the core's exit from now on is expected
        self._socket_dir = tempfile.mkdtemp(prefix="minerva-core-")
        inputs_address = f"ipc://{self._socket_dir}/inputs"
        outputs_address = f"ipc://{self._socket_dir}/outputs"
        self._context = zmq.Context()
        self._inputs = self._context.socket(zmq.PUSH)
        self._outputs = self._context.socket(zmq.PULL)
        for socket in (self._inputs, self._outputs):
            socket.setsockopt(zmq.LINGER, 0)
            socket.set_hwm(0)
        self._inputs.bind(inputs_address)
        self._outputs.bind(outputs_address)
        self.process = subprocess.Popen([sys.executable, "-m", "engine.core_process"], stdin=subprocess.PIPE)
        self.process.stdin.write(pickle.dumps((config, inputs_address, outputs_address)))
        self.process.stdin.close()
        self._pidfd = os.pidfd_open(self.process.pid)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "ProcessEngineClient":
        """Open the model's metadata and tokenizer here, start the core and wait until its engine is built."""
        from engine.assets import resolve_model
        from engine.loader import open_model
        from engine.tokenizer import load_tokenizer

        path, builtin_name = resolve_model(config.model)
        loaded = open_model(path, builtin_name)
        client = cls(config, load_tokenizer(loaded), loaded.info)
        try:
            client.wait_ready()
        except BaseException:
            client.kill()
            raise
        return client

    def wait_ready(self) -> None:
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._pidfd, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._outputs in events:
                message = wire.decode_output(self._outputs.recv())
                if isinstance(message, wire.LoadFailed):
                    raise EngineCoreError(message.message)
                if isinstance(message, wire.Ready):
                    self.description, self._stats = message.description, message.stats
                    return
            elif self._pidfd in events:
                raise EngineCoreError(f"the engine core process exited with status {self.process.wait()} "
                                      "while building the engine")

    # --- what the routes read ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def max_model_len(self) -> int:
        return self.description.max_model_len

    @property
    def grammars(self) -> GrammarCompiler:
        """This process's compiler: a schema is refused here before it reaches the core (which compiles its own)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_engine(self._tokenizer, self.description.vocab_size, self.config)
        return self._grammars

    def stats(self) -> dict[str, Any]:
        """The core's counters as of its last report (at most core_process.STATS_INTERVAL_S old)."""
        return dict(self._stats)

    @property
    def running(self) -> bool:
        return self._receiver is not None and self._receiver.is_alive() and self.failure is None

    # --- requests ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._receiver is not None or self.failure is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._receiver = threading.Thread(target=self._receive, name="minerva-core-client", daemon=True)
        self._receiver.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs; leaving the loop early (or being cancelled) aborts it in the core."""
        check_admissible(self.failure, self.running, request_id, self._queues)
        request_queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = request_queue
        self._send(wire.AddRequest(request_id, prompt, params))
        finished = False
        try:
            while not finished:
                item = await request_queue.get()
                if isinstance(item, Exception):
                    finished = True  # the core holds nothing of it any more
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._prompts.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._send(wire.Abort([request_id]))

    def end_requests(self, reason: str) -> int:
        """End every request in flight with EngineDeadError(reason) and abort them in the core (the server's
        shutdown deadline); call on the event loop."""
        ended = list(self._queues.items())
        self._queues.clear()
        for _, request_queue in ended:
            request_queue.put_nowait(EngineDeadError(reason))
        if ended:
            self._send(wire.Abort([request_id for request_id, _ in ended]))
        return len(ended)

    async def shutdown(self) -> None:
        """Stop the core (its running requests end with "abort"); open streams here end with EngineDeadError."""
        self._shutting_down = True
        if self.process.poll() is None:
            self._send(wire.Shutdown())
            try:
                await asyncio.to_thread(self.process.wait, SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._closing.set()
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.join)
        self._fail_queues("the engine shut down")
        self.kill()

    def kill(self) -> None:
        """Release everything this client holds (the core is killed if still running); safe to repeat."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._closing.set()
        if self._receiver is not None:
            self._receiver.join()
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None
        if not self._context.closed:
            self._outputs.close()
            self._inputs.close()
            self._context.term()
            os.close(self._pidfd)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _send(self, message: object) -> None:
        """Never blocks the event loop: with the core gone a PUSH socket has no peer and would wait for one
        (the message is dropped; the core's death ends every request anyway)."""
        if self._inputs.closed or self.failure is not None:
            return
        try:
            self._inputs.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass

    # --- the receiver thread and what it hands to the event loop ------------------------------------------------
    def _receive(self) -> None:
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._pidfd, zmq.POLLIN)
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(200))
                if self._outputs in events:
                    messages = []
                    try:
                        while True:
                            messages.append(wire.decode_output(self._outputs.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        pass
                    self._call(self._dispatch, messages)
                elif self._pidfd in events:
                    self._call(self._core_died, self.process.wait())
                    return
        finally:
            self._outputs.close()

    def _call(self, function: Callable, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _dispatch(self, messages: list) -> None:
        for message in messages:
            if isinstance(message, wire.Outputs):
                for output in message.outputs:
                    request_queue = self._queues.get(output.request_id)
                    if request_queue is not None:
                        output.prompt_token_ids = self._prompts.setdefault(output.request_id, output.prompt_token_ids)
                        request_queue.put_nowait(output)
                        if output.finished:
                            self._queues.pop(output.request_id, None)
            elif isinstance(message, wire.Stats):
                self._stats = message.stats
            elif isinstance(message, wire.RequestFailed):
                request_queue = self._queues.pop(message.request_id, None)
                if request_queue is not None:
                    request_queue.put_nowait(InvalidRequestError(message.message, message.param, message.code)
                                             if message.kind == "invalid" else EngineDeadError(message.message))
            elif isinstance(message, wire.Fatal):
                self._stop_for_good(message.reason)

    def _core_died(self, status: int) -> None:
        if not self._shutting_down:
            self._stop_for_good(f"the engine core process exited with status {status}")

    def _stop_for_good(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._fail_queues(reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _fail_queues(self, reason: str) -> None:
        for request_queue in self._queues.values():
            request_queue.put_nowait(EngineDeadError(reason))
        self._queues.clear()
