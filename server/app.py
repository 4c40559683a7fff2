"""The FastAPI application: `create_app(engines, settings)` serves one EngineClient per model name.

Around the routes, outermost first: the request id, observability (metrics and
the JSON request log, for every request, refused ones too), API keys (nobody
unauthenticated gets a body buffered), the body read under its size cap and
deadline, admission (rates, concurrency slots: taken only once the body is in),
then, with --request-timeout, the per-request deadline; with --allowed-origins,
CORS outside them all. Every error leaves in OpenAI's
shape (in Anthropic's under /v1/messages). The engines are started and shut down with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from engine.client import EngineClient
from server import chat, completions, info_routes, messages, tokenize_routes
from server.errors import install_error_handlers
from server.guard.body import BodyReader
from server.guard.cors import ShapedCORSMiddleware
from server.guard.deadline import RequestDeadline
from server.guard.http import AdmissionMiddleware, AuthMiddleware
from server.guard.keys import ApiKeys
from server.guard.rate_limit import Admission
from server.messages.errors import anthropic_error_body
from server.observability.http import ObservabilityMiddleware
from server.observability.metrics import Metrics
from server.request_id import RequestIdMiddleware
from server.responses_api import routes as responses_routes
from server.responses_api.sealing import ReasoningSeal
from server.responses_api.store import ResponseStore
from server.served_models import ServedModels
from server.settings import ServerSettings
from server.version import minerva_version

logger = logging.getLogger("minerva.server")


def create_app(engines: dict[str, EngineClient], settings: ServerSettings | None = None, *,
               manage_engines: bool = True) -> FastAPI:
    """engines: served model name -> EngineClient (in-process or the core process's client). With
    `manage_engines` the app starts and stops them."""
    settings = settings or ServerSettings()
    models = ServedModels(engines, dict(settings.model_aliases), settings.fallback_model)

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

    # redirect_slashes off: the redirect would be built from the client's Host header; a 404 in OpenAI's shape instead
    app = FastAPI(title="Minerva", version=minerva_version(), lifespan=lifespan, redirect_slashes=False)
    app.state.models = models
    app.state.settings = settings
    app.state.admission = Admission(settings.rate_limits)
    app.state.metrics = Metrics(lambda: {m.name: m.engine.stats() for m in models})
    app.state.weight_profiles = {}
    app.state.error_shapes = {"/v1/messages": anthropic_error_body}  # Anthropic's clients read Anthropic's errors
    app.state.responses = responses_routes.ResponsesState(ResponseStore(settings.responses_store),
                                                          ReasoningSeal.from_environment())
    install_error_handlers(app)
    if settings.request_timeout_s is not None:
        app.add_middleware(RequestDeadline, timeout_s=settings.request_timeout_s)
    app.add_middleware(AdmissionMiddleware, admission=app.state.admission, protect_metrics=settings.protect_metrics)
    app.state.draining = asyncio.Event()  # set by server/shutdown.py when a graceful shutdown starts
    # after the key is checked, before a slot is taken
    app.add_middleware(BodyReader, max_bytes=settings.request_limits.max_body_bytes,
                       timeout_s=settings.body_timeout_s, draining=app.state.draining)
    app.add_middleware(AuthMiddleware, keys=ApiKeys(settings.api_keys), protect_metrics=settings.protect_metrics)
    routers = (info_routes.public_router, info_routes.router, completions.router, chat.router, messages.router,
               tokenize_routes.router, responses_routes.router)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics,
                       routes=[route for router in routers for route in router.routes], log_prompts=settings.log_prompts)
    app.add_middleware(RequestIdMiddleware)
    if settings.allowed_origins:  # outermost: a browser's preflight is answered before the guard asks for a key
        app.add_middleware(ShapedCORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=list(settings.allowed_methods), allow_headers=list(settings.allowed_headers))
    for router in routers:
        app.include_router(router)
    return app
