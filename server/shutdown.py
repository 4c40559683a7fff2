"""A graceful shutdown that ends what is still open with an error, instead of cutting it off.

uvicorn waits up to --shutdown-timeout for running requests, then cancels them: streams still open
then ended with neither an error event nor `[DONE]`, and each left a traceback in the log (issue
23, audit 8). `DrainingServer` ends every engine request still in flight just before that deadline:
each stream sends its error event (and `[DONE]`), each waiting non-streamed request gets a 503,
their KV blocks go back, and one warning says how many were ended. Requests whose body is still
arriving when the shutdown starts get a 503 at once (server/guard/body.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable

import uvicorn

from engine.client import EngineClient

log = logging.getLogger("minerva.server")

SHUTDOWN_REASON = "the server is shutting down"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engines: Iterable[EngineClient], draining: asyncio.Event) -> None:
        """`draining`: the app's (server.app.create_app's `state.draining`), set to tell body reads to stop."""
        super().__init__(config)
        self.engines = list(engines)
        self.draining = draining

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.draining.set()  # bodies still arriving are refused now, not at --body-timeout
        grace = self.config.timeout_graceful_shutdown
        timer = None
        if grace is not None:  # ended a little before uvicorn gives up, so that the error events get out
            timer = asyncio.get_running_loop().call_later(max(0.0, grace - min(1.0, grace / 2)), self.end_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    def end_open_requests(self) -> int:
        ended = sum(engine.end_requests(SHUTDOWN_REASON) for engine in self.engines)
        if ended:
            log.warning("shutdown timeout reached: ended %d request(s) still running with an error", ended)
        return ended
