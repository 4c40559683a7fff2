"""Turning engine output streams into HTTP responses: one JSON body, or SSE with errors kept in-band."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.requests import Request

from engine.async_engine import EngineDeadError
from engine.outputs import RequestOutput
from server.choices import Collected
from server.errors import APIError, engine_unavailable, error_body
from server.sse import DONE, HEADERS, MEDIA_TYPE, sse_data
from server.streams import unless_disconnected

logger = logging.getLogger("minerva.server")

Outputs = AsyncIterator[tuple[int, RequestOutput]]


async def collect(request: Request, outputs: Outputs, n: int) -> Collected:
    """Every output to the end; the client disconnecting aborts the engine requests."""

    async def drain() -> Collected:
        collected = Collected(n)
        async with aclosing(outputs):
            async for prompt_index, output in outputs:
                collected.add(prompt_index, output)
        return collected

    return await unless_disconnected(request, drain())


async def stream(request: Request, outputs: Outputs,
                 render: Callable[[int, RequestOutput], Iterable[dict[str, Any]]],
                 finish: Callable[[], Iterable[dict[str, Any]]]) -> StreamingResponse:
    """SSE: `render` turns each engine output into chunks, `finish` adds the usage chunk; then `[DONE]`.

    The first engine output is awaited before the response starts, so a request the
    engine refuses still gets a proper HTTP error status instead of a broken stream.
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

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                for chunk in render(*first):
                    yield sse_data(chunk)
                async for prompt_index, output in iterator:
                    for chunk in render(prompt_index, output):
                        yield sse_data(chunk)
            for chunk in finish():
                yield sse_data(chunk)
        except (APIError, EngineDeadError) as exc:
            error = engine_unavailable(exc) if isinstance(exc, EngineDeadError) else exc
            yield sse_data(error_body(error.message, error.type, error.param, error.code))
        except Exception:
            logger.exception("internal error while streaming request %s", request_id)
            yield sse_data(error_body(f"internal server error (request id {request_id})", "server_error"))
        finally:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
        yield DONE

    return StreamingResponse(events(), media_type=MEDIA_TYPE, headers=HEADERS)
