"""Turning engine output streams into HTTP responses: one JSON body, or SSE with errors kept in-band."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.requests import Request

from engine.errors import EngineDeadError
from engine.outputs import RequestOutput
from server.choices import Collected
from server.errors import APIError, engine_unavailable, error_body
from server.sse import DONE, HEADERS, MEDIA_TYPE, sse_data
from server.streams import unless_disconnected

logger = logging.getLogger("minerva.server")

Outputs = AsyncGenerator[tuple[int, RequestOutput], None]  # closed (so aborted) when a response ends early

STREAM_ERROR_TAIL = "stream_error_tail"  # request.state / scope["state"] key: how a started stream ends on an error


async def collect(request: Request, outputs: Outputs, n: int) -> Collected:
    """Every output to the end; the client disconnecting aborts the engine requests."""

    async def drain() -> Collected:
        collected = Collected(n)
        async with aclosing(outputs):
            async for prompt_index, output in outputs:
                collected.add(prompt_index, output)
        return collected

    return await unless_disconnected(request, drain())


def error_chunks(error: APIError) -> Iterable[dict[str, Any]]:
    """OpenAI's chat/completions in-band error: one chunk with the error body."""
    return [error_body(error.message, error.type, error.param, error.code)]


async def stream(request: Request, outputs: Outputs,
                 render: Callable[[int, RequestOutput], Iterable[dict[str, Any]]],
                 finish: Callable[[], Iterable[dict[str, Any]]], *,
                 encode: Callable[[dict[str, Any]], str] = sse_data,
                 on_error: Callable[[APIError], Iterable[dict[str, Any]]] = error_chunks,
                 done: str = DONE) -> StreamingResponse:
    """SSE: `render` turns each engine output into chunks, `finish` adds the last ones; then `done`.

    The first engine output is awaited before the response starts, so a request the
    engine refuses still gets a proper HTTP error status instead of a broken stream.
    `encode` writes one chunk as SSE and `on_error` the chunks of an error met mid-stream
    (protocols with named events, like Responses and Messages, set both and `done=""`).
    """
    iterator = aiter(outputs)
    try:
        first = await unless_disconnected(request, anext(iterator))
    except StopAsyncIteration:
        first = None
    except BaseException:
        with anyio.CancelScope(shield=True):
            await outputs.aclose()
        raise
    request_id = getattr(request.state, "request_id", "unknown")

    def error_tail(error: APIError) -> str:
        """What ends this stream on `error`, in its own protocol: its error events, then `done`."""
        return "".join(encode(chunk) for chunk in on_error(error)) + done

    setattr(request.state, STREAM_ERROR_TAIL, error_tail)  # read by guard/deadline when it stops the stream

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                for chunk in render(*first):
                    yield encode(chunk)
                async for prompt_index, output in iterator:
                    for chunk in render(prompt_index, output):
                        yield encode(chunk)
            for chunk in finish():
                yield encode(chunk)
        except (APIError, EngineDeadError) as exc:
            error = engine_unavailable(exc) if isinstance(exc, EngineDeadError) else exc
            yield error_tail(error)
            return
        except Exception:
            logger.exception("internal error while streaming request %s", request_id)
            yield error_tail(APIError(500, f"internal server error (request id {request_id})", type="server_error"))
            return
        finally:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
        if done:
            yield done

    return StreamingResponse(events(), media_type=MEDIA_TYPE, headers=HEADERS)
