"""Read-only endpoints: /health, /version, the OpenAI model list and card, and the coding-tool helpers.

The tool helpers (under /v1/minerva/) are the prototype's: compact one-line model
ids, a batch check of many models at once, and a roofline throughput estimate.
None of them reads tensor data.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from engine.loader import ModelInfo, check_models
from server.errors import APIError
from server.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.protocol import ModelCheckRequest
from server.served_models import ServedModel, ServedModels
from server.version import minerva_version
from server.throughput import DEVICES, WeightProfile, device_key_for, estimate

router = APIRouter()
public_router = APIRouter()  # no API key: load balancers, probes and scrapers call these


def served_models(request: Request) -> ServedModels:
    models: ServedModels = request.app.state.models  # set by create_app
    return models


@public_router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "models": {m.name: msgspec.to_builtins(m.engine.stats()) for m in served_models(request)}}


@public_router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus exposition; behind the API key when the server runs with --protect-metrics."""
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@public_router.get("/version")
async def version() -> dict[str, str]:
    return {"version": minerva_version()}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [m.card() for m in served_models(request)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    return served_models(request).resolve(model_id).card()


def served_compact_id(served: ServedModel) -> str:
    """The loader's compact id, named by the served name clients use."""
    info: ModelInfo = served.engine.model_info
    return dataclasses.replace(info, id=served.name).compact_id


@router.get("/v1/minerva/compact")
async def compact_ids(request: Request) -> dict[str, list[str]]:
    """`name|quant|size|tensors|layers|vocab` per served model: a model list in a few tokens."""
    return {"models": [served_compact_id(m) for m in served_models(request)]}


@router.post("/v1/minerva/models/check")
async def check(body: ModelCheckRequest, request: Request) -> dict[str, list[dict[str, Any]]]:
    """For each entry: served (ok, compact id) or not. File paths are read only if the server allows it."""
    models = served_models(request)
    served = {m.name: m for m in models}
    results = []
    for entry in body.models:
        if entry in served:
            results.append({"model": entry, "ok": True, "compact_id": served_compact_id(served[entry]), "error": None})
        elif request.app.state.settings.allow_path_checks:
            (result,) = await asyncio.to_thread(check_models, [entry])
            results.append({"model": entry, "ok": result.ok, "compact_id": result.compact_id, "error": result.error})
        else:
            results.append({"model": entry, "ok": False, "compact_id": None, "error": "not served by this server"})
    return {"results": results}


@router.get("/v1/minerva/throughput")
async def throughput(request: Request, model: str | None = None, device: str | None = None,
                     batch: int = Query(1, ge=1, le=4096), context: int = Query(1024, ge=0, le=10_000_000)
                     ) -> dict[str, Any]:
    """Roofline decode estimate (see server/throughput.py and docs/server.md) for `device` or this server's own."""
    served = served_models(request).resolve(model)
    key = device or device_key_for(request.app.state.settings.device_name)
    if key not in DEVICES:
        raise APIError(400, f"unknown device {key!r}; known: {', '.join(DEVICES)}", param="device")
    profiles: dict[str, WeightProfile] = request.app.state.weight_profiles
    if served.name not in profiles:
        profiles[served.name] = await asyncio.to_thread(WeightProfile.of, served.engine.model_info)
    info = served.engine.model_info
    return {"model": served.name, "device_key": key,
            **estimate(info, profiles[served.name], DEVICES[key], batch, context)}
