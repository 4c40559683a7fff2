"""The engine core in its own process: `python -m engine.core_process`, started by engine.process_client.CoreProcess.

vLLM's EngineCore shape: one loop on this process's main thread drains requests and aborts between
steps, steps, and sends each API process the outputs of its requests as one message, with no event
loop or per-request task in between (the engine is built on this same thread, so torch keeps one
OpenMP pool). The core makes no text: its outputs carry token ids, and each API process detokenizes
its own requests and checks their stop strings (engine/stream_text.py), telling the core which samples
a stop string ended (FinishSamples), as vLLM's front end does. A structured request is prepared (its grammar compiled in a killable worker) on a side
thread and joins the running batch when ready, so a slow compile never stalls the steps.

Sockets (bound here, in a directory the launcher made): `requests` (PULL) takes [client name,
AddRequest | Abort | FinishSamples | ClientGone | Shutdown] from every API process and the launcher; `outputs`
(ROUTER) greets each API process's Hello with Ready and then sends it its Outputs, refusals and Stats.
Request ids are the API process's own: the engine sees them prefixed with the client's name, so two API
processes may use the same id. The core exits when told to, when the engine stops for good (after a
`Fatal` to every client), or when the process that started it is gone.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zmq

from engine import wire
from engine.async_engine import abort_all, describe
from engine.builder import build_engine
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, ParallelGroupError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25  # how stale an API server's /metrics and /health may be (and how often the parent is checked)
IDLE_POLL_MS = 250  # an idle core wakes this often for stats and the parent check
GREET_AFTER_FAILURE_S = 10.0  # a failed load still answers the Hellos that arrive this long


@dataclass(slots=True)
class Owner:
    client: bytes  # the API process's name (its outputs socket's routing id)
    request_id: str  # the id it knows the request by
    prompt_sent: bool = False  # its first output carried the prompt ids


class EngineCore:
    def __init__(self, engine: LLMEngine, requests: zmq.Socket[bytes], outputs: zmq.Socket[bytes]) -> None:
        self.engine = engine
        self.requests = requests
        self.outputs = outputs
        self.description = describe(engine)
        self.clients: set[bytes] = set()
        self.owners: dict[str, Owner] = {}  # engine request id -> who sent it
        self.preparing: dict[str, Future[Request]] = {}  # structured requests whose grammar compiles
        self._prepare = ThreadPoolExecutor(2, thread_name_prefix="minerva-prepare")
        self._parent = os.getppid()

    def run(self) -> int:
        """Serve until Shutdown (0), a dead parallel group (1) or a vanished parent (0)."""
        poller = zmq.Poller()
        poller.register(self.requests, zmq.POLLIN)
        poller.register(self.outputs, zmq.POLLIN)
        next_report = 0.0
        try:
            while True:
                busy = self.engine.has_unfinished()
                events = dict(poller.poll(0 if busy else 10 if self.preparing else IDLE_POLL_MS))
                if self.outputs in events:
                    self._greet()
                if self.requests in events and not self._receive():
                    return 0
                if self.preparing:
                    self._admit_prepared()
                if self.engine.has_unfinished():
                    try:
                        outputs = self.engine.step()
                    except ParallelGroupError as exc:
                        self._fatal(str(exc))
                        return 1
                    except Exception:  # the engine fails requests itself; this is a last resort
                        log.exception("engine step crashed")
                        outputs = abort_all(self.engine)
                    self._send(outputs)
                if (now := time.monotonic()) >= next_report:
                    next_report = now + STATS_INTERVAL_S
                    self._report_stats()
                    if os.getppid() != self._parent:
                        log.warning("the process that started the engine core is gone: the core stops")
                        return 0
        finally:
            abort_all(self.engine)
            self._prepare.shutdown(wait=False, cancel_futures=True)
            self.engine.close()

    # --- in -----------------------------------------------------------------------------------------------
    def _greet(self) -> None:
        stats = wire.encode(wire.Ready(self.description, self.engine.stats()))
        try:
            while True:
                client, payload = self.outputs.recv_multipart(zmq.NOBLOCK)
                wire.decode_hello(payload)
                self.clients.add(client)
                self.outputs.send_multipart([client, stats])
        except zmq.Again:
            pass

    def _receive(self) -> bool:
        """Apply every request and abort waiting; False once told to shut down."""
        try:
            while True:
                client, payload = self.requests.recv_multipart(zmq.NOBLOCK)
                message = wire.decode_input(payload)
                if isinstance(message, wire.AddRequest):
                    self._add(client, message)
                elif isinstance(message, wire.Abort):
                    for request_id in message.request_ids:
                        self._abort(engine_id(client, request_id))
                elif isinstance(message, wire.FinishSamples):
                    self._finish_samples(client, message)
                elif isinstance(message, wire.ClientGone):
                    gone = message.client.encode()
                    self.clients.discard(gone)
                    for key in [key for key, owner in self.owners.items() if owner.client == gone]:
                        self._abort(key)
                else:
                    return False
        except zmq.Again:
            return True

    def _add(self, client: bytes, message: wire.AddRequest) -> None:
        key = engine_id(client, message.request_id)
        if key in self.owners:
            self._refuse(client, message.request_id,
                         InvalidRequestError(f"request id {message.request_id!r} is already running", "request_id"))
            return
        self.owners[key] = Owner(client, message.request_id)
        if message.params.structured is not None:  # compiling may take seconds: off this loop
            self.preparing[key] = self._prepare.submit(self.engine.prepare_request, key, message.prompt,
                                                       message.params)
            return
        try:
            self.engine.add_prepared(self.engine.prepare_request(key, message.prompt, message.params))
        except InvalidRequestError as exc:
            del self.owners[key]
            self._refuse(client, message.request_id, exc)

    def _admit_prepared(self) -> None:
        for key, future in list(self.preparing.items()):
            if not future.done():
                continue
            del self.preparing[key]
            try:
                self.engine.add_prepared(future.result())
            except InvalidRequestError as exc:
                owner = self.owners.pop(key)
                self._refuse(owner.client, owner.request_id, exc)

    def _finish_samples(self, client: bytes, message: wire.FinishSamples) -> None:
        """Stop samples a stop string ended in their API process; a request they finish is forgotten (its last
        output goes nowhere: the API process finished it already)."""
        for request_id, index, stop in message.samples:
            key = engine_id(client, request_id)
            if key in self.preparing:
                continue  # not admitted yet, so no output of it reached the API process
            if self.engine.finish_sample(key, index, stop) is not None:
                self.owners.pop(key, None)

    def _abort(self, key: str) -> None:
        """Forget the request and free its blocks now (its client stopped listening)."""
        if self.owners.pop(key, None) is None:
            return
        preparing = self.preparing.pop(key, None)
        if preparing is not None:
            preparing.cancel()
        else:
            self.engine.abort(key)

    # --- out ----------------------------------------------------------------------------------------------
    def _send(self, outputs: list[RequestOutput]) -> None:
        batches: dict[bytes, list[RequestOutput]] = {}
        for output in outputs:
            owner = self.owners.get(output.request_id)
            if owner is None:
                continue
            if output.finished:
                del self.owners[output.request_id]
            if owner.prompt_sent:  # the client keeps them from the first output: a long prompt is not resent each token
                output.prompt_token_ids = []
            owner.prompt_sent = True
            output.request_id = owner.request_id
            batches.setdefault(owner.client, []).append(output)
        for client, batch in batches.items():
            self.outputs.send_multipart([client, wire.encode(wire.Outputs(batch))])

    def _refuse(self, client: bytes, request_id: str, exc: InvalidRequestError) -> None:
        self.outputs.send_multipart([client, wire.encode(wire.RequestFailed(request_id, str(exc), exc.param, exc.code))])

    def _report_stats(self) -> None:
        if self.clients:
            message = wire.encode(wire.Stats(self.engine.stats()))
            for client in self.clients:
                self.outputs.send_multipart([client, message])

    def _fatal(self, reason: str) -> None:
        log.critical("engine stopped: %s", reason)
        message = wire.encode(wire.Fatal(reason))
        for client in self.clients:
            self.outputs.send_multipart([client, message])


def engine_id(client: bytes, request_id: str) -> str:
    """The engine's name for a client's request (client names never contain the separator)."""
    return f"{client.decode()}\x1f{request_id}"


def answer_hellos(outputs: zmq.Socket[bytes], message: wire.LoadFailed) -> None:
    """Tell every API process waiting for the engine why it will not come."""
    deadline = time.monotonic() + GREET_AFTER_FAILURE_S
    while (left := deadline - time.monotonic()) > 0:
        if not outputs.poll(int(left * 1000)):
            return
        client, _ = outputs.recv_multipart()
        outputs.send_multipart([client, wire.encode(message)])


def freeze_start_up_heap() -> None:
    """Move what start-up allocated (torch's, the tokenizer's and the model's objects: ~380k for the tests' tiny
    model) out of the collector's reach, as vLLM's engine core does: a full collection then walks only what
    serving made (measured on that engine: 307 ms -> 0.01 ms), so a rare gen-2 pass no longer stalls a step."""
    gc.collect()
    gc.freeze()


def run_core(config: EngineConfig, requests_address: str, outputs_address: str) -> int:
    context = zmq.Context()
    requests = context.socket(zmq.PULL)
    outputs = context.socket(zmq.ROUTER)
    for socket in (requests, outputs):
        socket.setsockopt(zmq.LINGER, 5000)  # the last outputs and the Fatal get out before exit
        socket.set_hwm(0)  # never drop or block on a burst of requests or outputs
    requests.bind(requests_address)
    outputs.bind(outputs_address)
    try:
        try:
            engine = build_engine(config)
        except Exception as exc:  # the API processes report it as their own load error
            answer_hellos(outputs, wire.LoadFailed(str(exc) or type(exc).__name__))
            return 1
        engine.outputs.detokenize = False  # the API processes make the text (engine/stream_text.py)
        freeze_start_up_heap()
        return EngineCore(engine, requests, outputs).run()
    finally:
        requests.close()
        outputs.close()
        context.term()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="engine core: %(levelname)s %(message)s")
    config, requests_address, outputs_address = pickle.load(sys.stdin.buffer)
    return run_core(config, requests_address, outputs_address)


if __name__ == "__main__":
    sys.exit(main())
