"""The event-loop side every engine client shares: one asyncio queue per request in flight.

AsyncEngine (the engine in a thread of this process) and ProcessEngineClient (the engine core in a
process of its own) differ only in how a request and an abort reach the engine and how outputs come
back; both hand outputs to the event loop in batches, and from there the streams, the shutdown
deadline's `end_requests` and the engine's death for good work the same way, written here once.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import RequestOutput

StreamItem = RequestOutput | Exception  # an exception ends the stream with that error


class RequestStreams(ABC):
    """Subclasses say whether the engine runs (`running`) and how aborts reach it (`_send_aborts`)."""

    def __init__(self) -> None:
        self.failure: str | None = None  # why the engine stopped for good (None while it can serve)
        self.on_fatal: Callable[[str], None] | None = None  # the server's exit, called once on such a failure
        self._queues: dict[str, asyncio.Queue[StreamItem]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    @abstractmethod
    def running(self) -> bool:
        """Started and able to step."""

    @abstractmethod
    def _send_aborts(self, request_ids: list[str]) -> None:
        """Tell the engine to drop these requests (their blocks go back at its next step boundary)."""

    def _open(self, request_id: str) -> asyncio.Queue[StreamItem]:
        """The queue of a new request, after what every client checks first: a live, started engine and a
        request id not already in flight."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if not self.running:
            raise EngineDeadError("the engine is not running: call start() first")
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        request_queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._queues[request_id] = request_queue
        return request_queue

    async def _stream(self, request_id: str, request_queue: asyncio.Queue[StreamItem]) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until its last; leaving early (or being cancelled) aborts it."""
        finished = False
        try:
            while not finished:
                item = await request_queue.get()
                if isinstance(item, Exception):
                    finished = True  # the engine holds nothing of it any more
                    raise item
                finished = item.finished
                yield item
        finally:
            self._forget(request_id)
            if not finished:
                self._send_aborts([request_id])

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Ask the engine to drop the request at its next step boundary; returns at once."""
        self._send_aborts([request_id])

    def end_requests(self, reason: str) -> int:
        """End every request in flight with EngineDeadError(reason) and abort it in the engine, which keeps
        running (a server's shutdown deadline). Call on the event loop; returns how many were ended."""
        ended = list(self._queues)
        self._fail_queues(reason)
        if ended:
            self._send_aborts(ended)
        return len(ended)

    # --- on the event loop, handed over by whatever receives the engine's outputs -------------------------
    def _call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` on the event loop (it owns the request queues), from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(function, *args)

    def _deliver(self, outputs: Iterable[RequestOutput]) -> None:
        for output in outputs:
            request_queue = self._queues.get(output.request_id)
            if request_queue is not None:
                request_queue.put_nowait(output)
                if output.finished:
                    self._forget(output.request_id)

    def _fail(self, request_id: str, error: Exception) -> None:
        request_queue = self._queues.get(request_id)
        if request_queue is not None:
            self._forget(request_id)
            request_queue.put_nowait(error)

    def _fail_queues(self, reason: str) -> None:
        for request_id in list(self._queues):
            self._fail(request_id, EngineDeadError(reason))

    def _stopped_for_good(self, reason: str) -> None:
        """Every open stream ends with EngineDeadError(reason) (later requests too: `failure` is set) and the
        server is told to exit."""
        self.failure = reason
        self._fail_queues(reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)
