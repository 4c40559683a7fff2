"""The FastAPI application: `create_app(engines)` serves one AsyncEngine per model name.

Middleware-friendly: a request id is set first (pure ASGI), API keys are
checked by a dependency on the /v1 routes, and every error leaves in OpenAI's
shape. The engines are started and shut down with the app's lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request

from server import chat, completions, info_routes
from server.errors import APIError, install_error_handlers
from server.guard.keys import ApiKeys, AuthError
from server.request_id import RequestIdMiddleware
from server.served_models import ServedModels

logger = logging.getLogger("minerva.server")


def create_app(engines: dict[str, Any], *, api_keys: Iterable[str] = (), allow_path_checks: bool = False,
               device_name: str = "cpu", manage_engines: bool = True) -> FastAPI:
    """engines: served model name -> AsyncEngine. With `manage_engines` the app starts and stops them."""
    models = ServedModels(engines)
    keys = ApiKeys(api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = []
        try:
            if manage_engines:
                for model in models:
                    await model.engine.start()
                    started.append(model)
            yield
        finally:
            for model in started:
                await model.engine.shutdown()

    async def require_key(request: Request) -> None:
        if not keys.enabled:
            return
        try:
            request.state.key_id = keys.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            raise APIError(401, str(exc), code="invalid_api_key") from None

    app = FastAPI(title="Minerva", version=info_routes.minerva_version(), lifespan=lifespan)
    app.state.models = models
    app.state.allow_path_checks = allow_path_checks
    app.state.device_name = device_name
    app.state.weight_profiles = {}
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    guarded = [Depends(require_key)]
    app.include_router(info_routes.public_router)
    app.include_router(info_routes.router, dependencies=guarded)
    app.include_router(completions.router, dependencies=guarded)
    app.include_router(chat.router, dependencies=guarded)
    return app
