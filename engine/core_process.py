"""The engine core in its own process: `python -m engine.core_process`, started by ProcessEngineClient.

It builds an AsyncEngine from the EngineConfig the client pickles onto its stdin, connects to the
client's two ZeroMQ sockets (requests in, outputs out) and relays: each AddRequest becomes one
`generate` stream, an Abort cancels it (its blocks are freed at the next step boundary), and the
outputs of one step leave as one `Outputs` message. The step loop itself stays AsyncEngine's thread,
so the HTTP/SSE work of the API process never holds this process's GIL. The core exits when told to,
when the engine stops for good (after a `Fatal`), or when the API process that started it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import sys

import zmq
import zmq.asyncio

from engine import wire
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import InvalidRequestError
from engine.structured import GrammarError

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25  # how stale the API server's /metrics and /health may be
_KERNELS = {"kernels.reference": "torch", "kernels.triton_ops": "triton", "kernels.cpu_ops": "cpu"}


def describe(engine: LLMEngine) -> wire.EngineDescription:
    ops = getattr(engine.model, "local", engine.model).ops  # tensor parallel: rank 0's slice holds the ops
    return wire.EngineDescription(max_model_len=engine.max_model_len, vocab_size=engine.model.vocab_size,
                                  device=str(engine.model.device),
                                  dtype=str(engine.model.dtype).removeprefix("torch."),
                                  kernels=_KERNELS.get(ops.__name__, ops.__name__))


class CoreServer:
    """Relays between the sockets and one started AsyncEngine, on this process's event loop."""

    def __init__(self, engine: AsyncEngine, inputs: zmq.asyncio.Socket, outputs: zmq.asyncio.Socket) -> None:
        self.engine = engine
        self.inputs = inputs
        self.outputs = outputs
        self.streams: dict[str, asyncio.Task] = {}
        self.outbox: list = []
        self.done = asyncio.Event()
        self.exit_code = 0

    async def serve(self) -> int:
        self.engine.on_fatal = self._fatal
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._report_stats()),
                 asyncio.create_task(self._watch_parent())]
        await self.done.wait()
        for task in tasks:
            task.cancel()
        for stream in list(self.streams.values()):
            stream.cancel()
        await self.engine.shutdown()
        return self.exit_code

    async def _receive(self) -> None:
        while True:
            message = wire.decode_input(await self.inputs.recv())
            if isinstance(message, wire.AddRequest):
                self.streams[message.request_id] = asyncio.create_task(self._stream(message))
            elif isinstance(message, wire.Abort):
                for request_id in message.request_ids:
                    stream = self.streams.pop(request_id, None)
                    if stream is not None:
                        stream.cancel()  # generate's exit aborts it in the engine
            else:
                self.done.set()
                return

    async def _stream(self, request: wire.AddRequest) -> None:
        first = True
        try:
            if request.params.structured is not None:  # compiled off this loop; prepare_request then finds it cached
                with contextlib.suppress(GrammarError):  # prepare_request refuses it in its own words
                    await self.engine.grammars.compile_async(request.params.structured)
            async for output in self.engine.generate(request.prompt, request.params, request.request_id):
                if not first:  # the client keeps them from the first output: a long prompt is not resent every token
                    output.prompt_token_ids = []
                first = False
                self._queue(output)
        except InvalidRequestError as exc:
            self._queue(wire.RequestFailed(request.request_id, "invalid", str(exc), exc.param, exc.code))
        except EngineDeadError as exc:
            self._queue(wire.RequestFailed(request.request_id, "dead", str(exc)))
        finally:
            if self.streams.get(request.request_id) is asyncio.current_task():
                del self.streams[request.request_id]

    def _queue(self, item: object) -> None:
        """Collect what this loop iteration produces (a step's outputs wake every stream at once); sent as one batch."""
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.append(item)

    def _flush(self) -> None:
        outputs = [item for item in self.outbox if not isinstance(item, wire.RequestFailed)]
        failures = [item for item in self.outbox if isinstance(item, wire.RequestFailed)]
        self.outbox = []
        if outputs:
            self.outputs.send(wire.encode(wire.Outputs(outputs)))
        for failure in failures:
            self.outputs.send(wire.encode(failure))

    async def _report_stats(self) -> None:
        last = None
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            stats = self.engine.stats()
            if stats != last:
                self.outputs.send(wire.encode(wire.Stats(stats)))
                last = stats

    async def _watch_parent(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(0.5)
        log.warning("the API server process is gone: the engine core stops")
        self.done.set()

    def _fatal(self, reason: str) -> None:
        self._flush()
        self.outputs.send(wire.encode(wire.Fatal(reason)))
        self.exit_code = 1
        self.done.set()


async def run_core(config: EngineConfig, inputs_address: str, outputs_address: str) -> int:
    context = zmq.asyncio.Context()
    inputs = context.socket(zmq.PULL)
    outputs = context.socket(zmq.PUSH)
    for socket in (inputs, outputs):
        socket.setsockopt(zmq.LINGER, 5000)  # the last outputs and the Fatal get out before exit
        socket.set_hwm(0)  # never drop or block on a burst of requests or outputs
    inputs.connect(inputs_address)
    outputs.connect(outputs_address)
    try:
        try:
            engine = AsyncEngine.from_config(config)
        except Exception as exc:  # the API process reports it as its own load error
            outputs.send(wire.encode(wire.LoadFailed(str(exc) or type(exc).__name__)))
            return 1
        await engine.start()
        outputs.send(wire.encode(wire.Ready(describe(engine.engine), engine.stats())))
        return await CoreServer(engine, inputs, outputs).serve()
    finally:
        inputs.close()
        outputs.close()
        context.term()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="engine core: %(levelname)s %(message)s")
    config, inputs_address, outputs_address = pickle.load(sys.stdin.buffer)
    return asyncio.run(run_core(config, inputs_address, outputs_address))


if __name__ == "__main__":
    sys.exit(main())
