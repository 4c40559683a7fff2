"""The event-loop side every engine client shares: one OutputSlot per request in flight.

AsyncEngine (the engine in a thread of this process) and ProcessEngineClient (the engine core in a
process of its own) differ only in how a request and an abort reach the engine and how outputs come
back; both hand outputs to the event loop in batches, and from there the streams, the shutdown
deadline's `end_requests` and the engine's death for good work the same way, written here once.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable

from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import RequestOutput, merge_delta

class OutputSlot:
    """One request's outputs not yet taken by its stream, merged into one (vLLM's RequestOutputCollector): a
    stream that falls behind the engine takes one output covering several steps, so a loaded API process
    writes one SSE event and makes one socket write per stream per turn of its loop, not one per step. An
    error is handed over after the output before it."""

    __slots__ = ("_output", "_error", "_waiter")

    def __init__(self) -> None:
        self._output: RequestOutput | None = None
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: RequestOutput | Exception) -> None:
        if isinstance(item, Exception):
            self._error = item
        elif self._output is None:
            self._output = item
        else:
            merge_delta(self._output, item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> RequestOutput:
        """The outputs so far, merged; raises the error once they are taken."""
        while self._output is None and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        output, self._output = self._output, None
        if output is not None:
            return output
        assert self._error is not None
        raise self._error


class RequestStreams(ABC):
    """Subclasses say whether the engine runs (`running`) and how aborts reach it (`_send_aborts`)."""

    def __init__(self) -> None:
        self.failure: str | None = None  # why the engine stopped for good (None while it can serve)
        self.on_fatal: Callable[[str], None] | None = None  # the server's exit, called once on such a failure
        self._slots: dict[str, OutputSlot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    @abstractmethod
    def running(self) -> bool:
        """Started and able to step."""

    @abstractmethod
    def _send_aborts(self, request_ids: list[str]) -> None:
        """Tell the engine to drop these requests (their blocks go back at its next step boundary)."""

    def _open(self, request_id: str) -> OutputSlot:
        """The queue of a new request, after what every client checks first: a live, started engine and a
        request id not already in flight."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if not self.running:
            raise EngineDeadError("the engine is not running: call start() first")
        if request_id in self._slots:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        slot = self._slots[request_id] = OutputSlot()
        return slot

    async def _stream(self, request_id: str, slot: OutputSlot) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until its last; leaving early (or being cancelled) aborts it."""
        finished = False
        try:
            while not finished:
                try:
                    output = await slot.get()
                except Exception:
                    finished = True  # the engine holds nothing of it any more
                    raise
                finished = output.finished
                yield output
        finally:
            self._forget(request_id)
            if not finished:
                self._send_aborts([request_id])

    def _forget(self, request_id: str) -> None:
        self._slots.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Ask the engine to drop the request at its next step boundary; returns at once."""
        self._send_aborts([request_id])

    def end_requests(self, reason: str) -> int:
        """End every request in flight with EngineDeadError(reason) and abort it in the engine, which keeps
        running (a server's shutdown deadline). Call on the event loop; returns how many were ended."""
        ended = list(self._slots)
        self._fail_all(reason)
        if ended:
            self._send_aborts(ended)
        return len(ended)

    # --- on the event loop, handed over by whatever receives the engine's outputs -------------------------
    def _call(self, function: Callable[..., object], *args: object) -> None:
        """Run `function(*args)` on the event loop (it owns the request queues), from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _deliver(self, outputs: Iterable[RequestOutput]) -> None:
        for output in outputs:
            slot = self._slots.get(output.request_id)
            if slot is not None:
                slot.put(output)
                if output.finished:
                    self._forget(output.request_id)

    def _fail(self, request_id: str, error: Exception) -> None:
        slot = self._slots.get(request_id)
        if slot is not None:
            self._forget(request_id)
            slot.put(error)

    def _fail_all(self, reason: str) -> None:
        for request_id in list(self._slots):
            self._fail(request_id, EngineDeadError(reason))

    def _stopped_for_good(self, reason: str) -> None:
        """Every open stream ends with EngineDeadError(reason) (later requests too: `failure` is set) and the
        server is told to exit."""
        self.failure = reason
        self._fail_all(reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)
