"""`minerva serve`: build one engine per model from the command line (and an optional TOML), then run uvicorn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.config import ConfigError, EngineConfig
from engine.loader import ModelLoadError


class LaunchError(Exception):
    """The command line cannot be turned into served models; the message says why."""


def default_model() -> str:
    """The shipped default model's path, or a clear error while none is shipped."""
    try:
        from engine.assets import default_model_path
    except ImportError:
        raise LaunchError("no default model shipped: pass a MODEL path (a .gguf, .safetensors or HF directory)") from None
    path = default_model_path()
    if path is None or not Path(path).exists():
        raise LaunchError(f"no default model shipped (expected at {path}): pass a MODEL path")
    return str(path)


def engine_configs(args: argparse.Namespace) -> list[EngineConfig]:
    """One EngineConfig per MODEL; --config supplies the defaults, the command line wins."""
    models = list(args.models) or [default_model()]
    names = list(args.served_model_name or [])
    if names and len(names) != len(models):
        raise LaunchError(f"--served-model-name given {len(names)} time(s) for {len(models)} model(s): "
                          "give one name per model, in the same order")
    if len(set(names)) != len(names):
        raise LaunchError("--served-model-name values must be distinct")
    configs = []
    for index, model in enumerate(models):
        overrides = {"model": model, "served_model_name": names[index] if names else None, "device": args.device}
        try:
            if args.config:
                configs.append(EngineConfig.from_toml(args.config, **overrides))
            else:
                configs.append(EngineConfig(**{k: v for k, v in overrides.items() if v is not None}))
        except ConfigError as exc:
            raise LaunchError(str(exc)) from exc
    return configs


def build_engines(configs: list[EngineConfig]) -> dict[str, Any]:
    """served name -> AsyncEngine; two models under one name is an error."""
    from engine.async_engine import AsyncEngine

    engines: dict[str, Any] = {}
    for config in configs:
        try:
            engine = AsyncEngine.from_config(config)
        except (ModelLoadError, ConfigError) as exc:
            raise LaunchError(str(exc)) from exc
        name = config.served_model_name or engine.model_info.id
        if name in engines:
            raise LaunchError(f"two models would be served as {name!r}: use --served-model-name")
        engines[name] = engine
    return engines


def device_name(configs: list[EngineConfig]) -> str:
    """What the throughput estimate assumes by default: this machine's GPU name, or cpu."""
    import torch

    if any(c.device in ("auto", "cuda") for c in configs) and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    try:
        configs = engine_configs(args)
        engines = build_engines(configs)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(engines, api_keys=[args.api_key] if args.api_key else [],
                     allow_path_checks=args.allow_path_checks, device_name=device_name(configs))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    serve.add_argument("models", nargs="*", metavar="MODEL",
                       help="model paths (.gguf, .safetensors, HF dir); none = the shipped default model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", action="append", metavar="NAME",
                       help="name clients use in `model` (repeat once per MODEL, in order)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    serve.add_argument("--config", metavar="FILE", help="TOML file with an [engine] table (see configs/)")
    serve.add_argument("--allow-path-checks", action="store_true",
                       help="let POST /v1/minerva/models/check read metadata of server-side file paths")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(handler=serve_command)
