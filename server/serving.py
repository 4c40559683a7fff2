"""Running one API server: the app over its engines under uvicorn, until a signal or an engine's death.

Shared by `minerva serve` in one process and by each API process of `--api-server-count N`
(server/api_servers.py), which hands in the listening socket they all accept on.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

from engine.client import EngineClient
from engine.config import EngineConfig
from server.engine_args import LaunchError
from server.settings import ServerSettings

log = logging.getLogger("minerva.server")

# An API server process's CPU priority below its engine core's (a nice value, 0..19). Every stream waits on the
# core's steps, while an API process that falls behind loses only granularity: a stream's pending outputs merge
# into one (engine/request_streams.OutputSlot), written as one SSE event in one socket write. On a host with
# fewer free cores than busy processes the kernel then keeps the core stepping and lets the API processes take
# what is left, where at equal priority they took the core's share (bench/host_ceiling).
API_PROCESS_NICENESS = 5


def add_served(engines: dict[str, EngineClient], config: EngineConfig, engine: EngineClient) -> None:
    """Serve `engine` under its --served-model-name, else its model's id; two under one name are a LaunchError."""
    name = config.served_model_name or engine.model_info.id
    if name in engines:
        raise LaunchError(f"two models would be served as {name!r}: use --served-model-name")
    engines[name] = engine


def banner_lines(engines: dict[str, EngineClient], url: str) -> list[str]:
    """One line per served model: where, what context, how many tokens the KV cache holds, on what."""
    lines = []
    for name, engine in engines.items():
        about = engine.describe()
        lines.append(f"Minerva serving {name!r} at {url}/v1: context {about.max_model_len} tokens, KV cache "
                     f"{engine.stats().kv_cache_tokens} tokens ({about.kv_cache_dtype}), device {about.device}, {about.dtype}, "
                     f"{about.kernels} kernels")
    return lines


def device_name(engines: dict[str, EngineClient]) -> str:
    """What the throughput estimate assumes by default: this machine's GPU name where an engine runs on one, or cpu."""
    if any(engine.describe().device.startswith("cuda") for engine in engines.values()):
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def defer_to_engine_cores() -> None:
    """Lower this API server process's CPU priority below the engine core processes' (API_PROCESS_NICENESS). Call
    once the cores run: a process started after this would inherit it."""
    os.nice(API_PROCESS_NICENESS)


def uvicorn_config(app: Any, args: argparse.Namespace) -> Any:
    """uvicorn's settings from the flags. Proxy headers only from --forwarded-allow-ips: uvicorn's default
    trusts X-Forwarded-For from local peers, which let any local client pick its rate-limit address. HTTP/1.1
    through h11 with its 400s in OpenAI's shape (server/http_protocol.py)."""
    import uvicorn

    from server.http_protocol import ShapedH11Protocol

    return uvicorn.Config(app, http=ShapedH11Protocol, host=args.host, port=args.port, log_level=args.log_level,
                          log_config=None, access_log=False, timeout_graceful_shutdown=args.shutdown_timeout,
                          ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                          proxy_headers=args.forwarded_allow_ips is not None,
                          forwarded_allow_ips=args.forwarded_allow_ips or "")


def serve_app(engines: dict[str, EngineClient], settings: ServerSettings, args: argparse.Namespace, *,
              banner: bool, sockets: list[socket.socket] | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or an engine's death, which drains like a SIGTERM); 1 if an engine died."""
    from server.app import create_app
    from server.shutdown import DrainingServer

    if banner:
        scheme = "https" if args.ssl_certfile else "http"
        for line in banner_lines(engines, f"{scheme}://{args.host}:{args.port}"):
            log.info(line)
    # uvicorn re-raises the signal it stopped on once it is done; with the default SIGTERM action
    # that would kill the process (status 143) after a clean shutdown, so the re-raise lands here.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    for engine in engines.values():  # a dead tensor-parallel rank or core process: drain, then exit 1
        engine.on_fatal = lambda reason: os.kill(os.getpid(), signal.SIGTERM)
    try:
        app = create_app(engines, settings)
    except ValueError as exc:  # a --fallback-model that names no served model
        raise LaunchError(str(exc)) from exc
    # What start-up made (the app, its libraries, an in-process engine) leaves the collector's reach, as a core's
    # does (engine.core_process.freeze_start_up_heap): a full collection walks only what requests make.
    gc.collect()
    gc.freeze()
    DrainingServer(uvicorn_config(app, args), engines.values(), app.state.draining).run(sockets=sockets)
    failures = [f"{name}: {engine.failure}" for name, engine in engines.items() if engine.failure]
    for failure in failures:
        print(f"error: engine stopped: {failure}", file=sys.stderr)
    return 1 if failures else 0
