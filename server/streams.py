"""Running engine requests on behalf of one HTTP request: merging several prompts, aborting on disconnect.

Every path out of these helpers (finished, client gone, error) leaves no request
running in the engine: unfinished sub-requests are aborted under a shielded
cancel scope, so the abort itself survives the cancellation that triggered it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import ClientDisconnected

T = TypeVar("T")


class GeneratingEngine(Protocol):
    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> AsyncGenerator[RequestOutput, None]: ...

    async def abort(self, request_id: str) -> None: ...


async def generate_many(engine: GeneratingEngine, prompts: list[list[int]], params: SamplingParams,
                        request_id: str) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of one engine request per prompt, interleaved as they come, tagged with the prompt index.

    One prompt (every chat, Responses and Messages request, most completions) is read straight from the
    engine's stream, with no task and queue between: each output then reaches the response one turn of the
    event loop sooner, and a busy API process spends a task wake-up less per output."""
    if len(prompts) == 1:
        stream = engine.generate(prompts[0], params, request_id)
        try:
            async for only in stream:
                yield 0, only
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # the engine's stream aborts its request unless it finished
        return
    ids = [f"{request_id}-{i}" for i in range(len(prompts))]
    finished: set[str] = set()
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for output in engine.generate(prompts[index], params, ids[index]):
                if output.finished:
                    finished.add(ids[index])
                queue.put_nowait((index, output, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, None, exc))
        else:
            queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rid in ids:
                if rid not in finished:
                    await engine.abort(rid)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects first."""
    task: asyncio.Task[Any] = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            result: T = task.result()  # the task runs `work`
            return result
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
