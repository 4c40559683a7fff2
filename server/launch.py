"""`minerva serve`: build one engine per model from the command line (and an optional TOML), then run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from engine.config import ConfigError, EngineConfig
from engine.loader import ModelLoadError
from server.guard.keys import ApiKeys, read_keys_file
from server.guard.rate_limit import Limits
from server.guard.request_limits import RequestLimits
from server.observability.request_log import configure_json_logging
from server.settings import ServerSettings


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
        overrides = {"model": model, "served_model_name": names[index] if names else None, "device": args.device,
                     "tensor_parallel_size": args.tensor_parallel_size,
                     "enforce_eager": args.enforce_eager}
        try:
            if args.config:
                configs.append(EngineConfig.from_toml(args.config, **overrides))
            else:
                configs.append(EngineConfig(**{k: v for k, v in overrides.items() if v is not None}))
        except ConfigError as exc:
            raise LaunchError(str(exc)) from exc
    if sum(c.tensor_parallel_size > 1 for c in configs) > 1:
        raise LaunchError("only one model per server can be tensor-parallel (the ranks share one process group)")
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


def server_settings(args: argparse.Namespace, configs: list[EngineConfig]) -> ServerSettings:
    """The operator's flags as ServerSettings; a bad keys file or limit is a LaunchError."""
    keys = list(args.api_key or [])
    try:
        if args.api_keys_file:
            keys += read_keys_file(args.api_keys_file)
        if args.protect_metrics and not keys:
            raise ValueError("--protect-metrics needs --api-key or --api-keys-file")
        request_limits = RequestLimits(max_body_bytes=args.max_body_bytes, max_n=args.max_n, max_stop=args.max_stop,
                                       max_logprobs=args.max_logprobs, max_messages=args.max_messages,
                                       max_prompts=args.max_prompts)
        ApiKeys(keys)  # refuse empty or whitespace keys before the models load
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    rate_limits = Limits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                         max_concurrent_per_client=args.max_concurrent_per_key, max_pending=args.max_pending)
    return ServerSettings(api_keys=tuple(keys), protect_metrics=args.protect_metrics, rate_limits=rate_limits,
                          request_limits=request_limits, log_prompts=args.log_prompts,
                          allow_path_checks=args.allow_path_checks, device_name=device_name(configs))


def serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; then stop accepting, let running requests finish (or abort them
    after --shutdown-timeout seconds), shut the engines down and exit 0 (1 if an engine died: a
    tensor-parallel rank gone)."""
    import signal

    import uvicorn

    from server.app import create_app

    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        print("error: --ssl-keyfile and --ssl-certfile go together", file=sys.stderr)
        return 2
    configure_json_logging(args.log_level)
    try:
        configs = engine_configs(args)
        settings = server_settings(args, configs)
        engines = build_engines(configs)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # uvicorn re-raises the signal it stopped on once it is done; with the default SIGTERM action
    # that would kill the process (status 143) after a clean shutdown, so the re-raise lands here.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    for engine in engines.values():  # a dead tensor-parallel rank: drain like a SIGTERM, then exit 1
        engine.on_fatal = lambda reason: os.kill(os.getpid(), signal.SIGTERM)
    uvicorn.run(create_app(engines, settings), host=args.host, port=args.port, log_level=args.log_level,
                log_config=None, access_log=False, timeout_graceful_shutdown=args.shutdown_timeout,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    failures = [f"{name}: {engine.failure}" for name, engine in engines.items() if engine.failure]
    for failure in failures:
        print(f"error: engine stopped: {failure}", file=sys.stderr)
    return 1 if failures else 0


def add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    serve.add_argument("models", nargs="*", metavar="MODEL",
                       help="model paths (.gguf, .safetensors, HF dir); none = the shipped default model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", action="append", metavar="NAME",
                       help="name clients use in `model` (repeat once per MODEL, in order)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    serve.add_argument("--config", metavar="FILE", help="TOML file with an [engine] table (see configs/)")
    serve.add_argument("--tensor-parallel-size", type=positive_int, default=None, metavar="N",
                       help="split the model over N GPUs (or N CPU processes) with torch.distributed (default 1)")
    serve.add_argument("--enforce-eager", action="store_true", default=None,
                       help="CUDA: run every step eagerly (no CUDA graph capture or replay)")
    serve.add_argument("--allow-path-checks", action="store_true",
                       help="let POST /v1/minerva/models/check read metadata of server-side file paths")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--log-prompts", action="store_true", help="put prompt text in the JSON request log")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM, how long running requests may finish before they are aborted")
    serve.add_argument("--ssl-keyfile", metavar="FILE", help="serve HTTPS with this private key")
    serve.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate")

    access = serve.add_argument_group("access")
    access.add_argument("--api-key", action="append", metavar="KEY",
                        help="accept `Authorization: Bearer KEY` on /v1 routes (repeatable)")
    access.add_argument("--api-keys-file", metavar="FILE", help="more keys, one per line ('#' comments)")
    access.add_argument("--protect-metrics", action="store_true", help="/metrics needs a key too")

    limits = serve.add_argument_group("rate limits (per API key, or per client address without keys)")
    limits.add_argument("--rpm", type=positive_int, metavar="N", help="requests per minute")
    limits.add_argument("--tpm", type=positive_int, metavar="N",
                        help="tokens per minute (prompt + max_tokens reserved, settled with the real use at the end)")
    limits.add_argument("--max-concurrent-per-key", type=positive_int, metavar="N",
                        help="generation requests in flight per client; beyond it a 429")
    limits.add_argument("--max-pending", type=positive_int, default=1024, metavar="N",
                        help="generation requests in flight server-wide; beyond it a 503 (default 1024)")

    request = serve.add_argument_group("request limits (a request over one is a 400 naming the field)")
    defaults = RequestLimits()
    request.add_argument("--max-body-bytes", type=positive_int, default=defaults.max_body_bytes, metavar="N")
    request.add_argument("--max-n", type=positive_int, default=defaults.max_n, metavar="N", help="n and best_of")
    request.add_argument("--max-prompts", type=positive_int, default=defaults.max_prompts, metavar="N",
                         help="prompts in one /v1/completions request")
    request.add_argument("--max-stop", type=positive_int, default=defaults.max_stop, metavar="N",
                         help="stop sequences")
    request.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs, metavar="N",
                         help="logprobs / top_logprobs")
    request.add_argument("--max-messages", type=positive_int, default=defaults.max_messages, metavar="N",
                         help="chat messages")
    serve.set_defaults(handler=serve_command)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
