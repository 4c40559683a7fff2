"""The EngineClient of an engine core running in its own process (engine/core_process.py).

`CoreProcess` starts a core and owns it (its sockets' directory, its exit); `ProcessEngineClient` is one
API process's connection to a core, whether it started the core itself (`from_config`, one API process)
or was handed its address by a launcher (`connect`, `--api-server-count N`). An API process keeps what its
routes need before the engine does (the tokenizer, the model's metadata, a grammar compiler to refuse
bad schemas) and sends everything else over ZeroMQ: requests and aborts out, batched outputs, refusals
and stats back. The core's outputs carry token ids: this process makes their text and checks stop
strings (engine/stream_text.py), so the core's step does no detokenization. One daemon thread
receives, decodes and hands each batch to the event loop in one `call_soon_threadsafe`, and watches the core through a pidfd: if the core dies, every open stream ends
with EngineDeadError and `on_fatal` tells the server to exit.
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
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import zmq

from engine import wire
from engine.config import EngineConfig
from engine.errors import EngineCoreError, InvalidRequestError
from engine.loader.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.reports import EngineDescription, EngineStats
from engine.request_streams import RequestStreams
from engine.sampling_params import SamplingParams
from engine.stream_text import RequestText
from engine.structured import GrammarCompiler
from engine.structured.spec import StructuredOutput
from engine.tokenizer import Tokenizer

SHUTDOWN_TIMEOUT_S = 30.0  # the core finishes its step and closes the model; then it is killed
LAUNCHER = "launcher"  # the name CoreProcess greets its core with (API processes are api-0, api-1, ...)


@dataclass(frozen=True)
class CoreAddress:
    """Where an API process finds a running core (picklable: handed to spawned API processes)."""

    requests: str
    outputs: str
    pid: int


class CoreProcess:
    """An engine core this process started and stops; `start` returns once its engine is built."""

    def __init__(self, config: EngineConfig) -> None:
        self._socket_dir = tempfile.mkdtemp(prefix="minerva-core-")
        requests, outputs = f"ipc://{self._socket_dir}/requests", f"ipc://{self._socket_dir}/outputs"
        self.process = subprocess.Popen([sys.executable, "-m", "engine.core_process"], stdin=subprocess.PIPE)
        assert self.process.stdin is not None
        self.process.stdin.write(pickle.dumps((config, requests, outputs)))
        self.process.stdin.close()
        self.address = CoreAddress(requests, outputs, self.process.pid)
        self._context = zmq.Context()
        self._control = self._context.socket(zmq.PUSH)
        self._control.setsockopt(zmq.LINGER, 1000)
        self._control.connect(requests)

    @classmethod
    def start(cls, config: EngineConfig) -> CoreProcess:
        core = cls(config)
        try:
            connection = Connection(core.address, LAUNCHER)
            try:
                connection.wait_ready(core.exit_status)
            finally:
                connection.close()
        except BaseException:
            core.stop(0)
            raise
        return core

    def exit_status(self) -> str:
        return f"exited with status {self.process.wait()}"

    def client_gone(self, name: str) -> None:
        """An API process died: its requests stop and free their blocks."""
        self._control.send_multipart([LAUNCHER.encode(), wire.encode(wire.ClientGone(name))])

    def stop(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Ask the core to stop (its requests end with "abort"), kill it past `timeout_s`; safe to repeat."""
        if self.process.poll() is None:
            self._control.send_multipart([LAUNCHER.encode(), wire.encode(wire.Shutdown())])
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._context.closed:
            self._control.close(linger=0)
            self._context.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


class Connection:
    """One process's two sockets to a core (requests out; outputs, refusals and stats in) and a pidfd on it."""

    def __init__(self, address: CoreAddress, name: str) -> None:
        self.name = name.encode()
        self.context = zmq.Context()
        self.requests = self.context.socket(zmq.PUSH)
        self.outputs = self.context.socket(zmq.DEALER)
        self.outputs.setsockopt(zmq.ROUTING_ID, self.name)
        for socket in (self.requests, self.outputs):
            socket.setsockopt(zmq.LINGER, 0)
            socket.set_hwm(0)
        self.requests.connect(address.requests)
        self.outputs.connect(address.outputs)
        self.pidfd = os.pidfd_open(address.pid)

    def wait_ready(self, core_exit: Callable[[], str]) -> wire.Ready:
        """Greet the core and wait for its engine; EngineCoreError if it cannot be built or the core exits.
        `core_exit()`: how the core's exit is told (its status, where known)."""
        self.outputs.send(wire.encode(wire.Hello()))
        poller = zmq.Poller()
        poller.register(self.outputs, zmq.POLLIN)
        poller.register(self.pidfd, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self.outputs in events:
                message = wire.decode_output(self.outputs.recv())
                if isinstance(message, wire.LoadFailed):
                    raise EngineCoreError(message.message)
                if isinstance(message, wire.Ready):
                    return message
            elif self.pidfd in events:
                raise EngineCoreError(f"the engine core process {core_exit()} while building the engine")

    def send(self, message: object) -> None:
        """Never blocks: with the core gone a PUSH socket has no peer and would wait for one (the message is
        dropped; the core's death ends every request anyway)."""
        try:
            self.requests.send_multipart([self.name, wire.encode(message)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        if not self.context.closed:
            self.outputs.close()
            self.requests.close()
            self.context.term()
            os.close(self.pidfd)


class ProcessEngineClient(RequestStreams):
    def __init__(self, connection: Connection, config: EngineConfig, tokenizer: Tokenizer, model_info: ModelInfo,
                 core: CoreProcess | None = None) -> None:
        """`core`: the core process this client started (stopped with it), None for a launcher's core."""
        super().__init__()
        self.config = config
        self._connection = connection
        self.core = core
        self._tokenizer = tokenizer
        self._model_info = model_info
        ready = connection.wait_ready(core.exit_status if core is not None else lambda: "exited")
        self._description: EngineDescription = ready.description
        self._stats: EngineStats = ready.stats
        self._texts: dict[str, RequestText] = {}  # request id -> its detokenizers (and prompt ids, sent once)
        self._grammars: GrammarCompiler | None = None
        self._receiver: threading.Thread | None = None
        self._closing = threading.Event()  # the receiver thread stops
        self._shutting_down = False  # the core's exit from now on is expected

    @classmethod
    def from_config(cls, config: EngineConfig) -> ProcessEngineClient:
        """Start a core of this process's own and wait until its engine is built."""
        tokenizer, model_info = open_front(config)
        core = CoreProcess.start(config)
        try:
            return cls(Connection(core.address, "api-0"), config, tokenizer, model_info, core)
        except BaseException:
            core.stop(0)
            raise

    @classmethod
    def connect(cls, config: EngineConfig, address: CoreAddress, name: str) -> ProcessEngineClient:
        """Join a core a launcher started (one of several API processes); `name` is this process's, unique."""
        tokenizer, model_info = open_front(config)
        return cls(Connection(address, name), config, tokenizer, model_info)

    # --- what the routes read ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def max_model_len(self) -> int:
        return self._description.max_model_len

    def describe(self) -> EngineDescription:
        return self._description

    async def compile_structured(self, spec: StructuredOutput) -> None:
        """Compiled here so a bad schema is refused before it reaches the core (which compiles its own)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_engine(self._tokenizer, self._description.vocab_size, self.config)
        await self._grammars.compile_async(spec)

    def stats(self) -> EngineStats:
        """The core's counters as of its last report (at most core_process.STATS_INTERVAL_S old)."""
        return self._stats

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
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Stream this request's outputs; leaving the loop early (or being cancelled) aborts it in the core."""
        slot = self._open(request_id)
        self._texts[request_id] = RequestText(self._tokenizer, params)
        self._send(wire.AddRequest(request_id, prompt, params))
        async for output in self._stream(request_id, slot):
            yield output

    def _send_aborts(self, request_ids: list[str]) -> None:
        self._send(wire.Abort(request_ids))

    def _forget(self, request_id: str) -> None:
        super()._forget(request_id)
        self._texts.pop(request_id, None)

    async def shutdown(self) -> None:
        """Stop the core if this client started it (its running requests end with "abort"); open streams here
        end with EngineDeadError."""
        self._shutting_down = True
        if self.core is not None:
            await asyncio.to_thread(self.core.stop)
        self._closing.set()
        if self._receiver is not None:
            await asyncio.to_thread(self._receiver.join)
        self._fail_all("the engine shut down")
        self.kill()

    def kill(self) -> None:
        """Release everything this client holds (a core it started is killed if still running); safe to repeat."""
        self._shutting_down = True
        self._closing.set()
        if self._receiver is not None:
            self._receiver.join()
        if self.core is not None:
            self.core.stop(0)
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None
        self._connection.close()

    def _send(self, message: object) -> None:
        if self.failure is None and not self._connection.context.closed:
            self._connection.send(message)

    # --- the receiver thread and what it hands to the event loop ------------------------------------------------
    def _receive(self) -> None:
        outputs, pidfd = self._connection.outputs, self._connection.pidfd
        poller = zmq.Poller()
        poller.register(outputs, zmq.POLLIN)
        poller.register(pidfd, zmq.POLLIN)
        while not self._closing.is_set():
            events = dict(poller.poll(200))
            if outputs in events:
                messages = []
                try:
                    while True:
                        messages.append(wire.decode_output(outputs.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    pass
                self._call(self._dispatch, messages)
            elif pidfd in events:
                status = self.core.exit_status() if self.core is not None else "exited"
                self._call(self._core_died, status)
                return

    def _dispatch(self, messages: list[wire.CoreOutput]) -> None:
        for message in messages:
            if isinstance(message, wire.Outputs):
                self._deliver(self._with_text(message.outputs))
            elif isinstance(message, wire.Stats):
                self._stats = message.stats
            elif isinstance(message, wire.RequestFailed):
                self._fail(message.request_id, InvalidRequestError(message.message, message.param, message.code))
            elif isinstance(message, wire.Fatal) and self.failure is None:
                self._stopped_for_good(message.reason)

    def _with_text(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The outputs of requests still streamed here, with their text; the core stops what a stop string ended."""
        texted, stopped = [], []
        for output in outputs:
            text = self._texts.get(output.request_id)
            if text is None:
                continue  # its stream ended (a stop string here, or its client left): the core hears of it
            for index, stop in text.apply(output):
                stopped.append((output.request_id, index, stop))
            texted.append(output)
        if stopped:
            self._send(wire.FinishSamples(stopped))
        return texted

    def _core_died(self, status: str) -> None:
        if not self._shutting_down and self.failure is None:
            self._stopped_for_good(f"the engine core process {status}")


def open_front(config: EngineConfig) -> tuple[Tokenizer, ModelInfo]:
    """What an API process reads of the model itself: its tokenizer and metadata (no weights)."""
    from engine.assets import resolve_model
    from engine.loader import open_model
    from engine.tokenizer import load_tokenizer

    path, builtin_name = resolve_model(config.model)
    loaded = open_model(path, builtin_name)
    return load_tokenizer(loaded), loaded.info
