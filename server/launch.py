"""`minerva serve`: build one engine per model from the command line (and an optional TOML), then run uvicorn.

Imports nothing heavy at module level: the parser it adds is built for every `minerva`
command, `inspect` included, which must not pay for torch or FastAPI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from server.engine_args import LaunchError, add_engine_flags, engine_config, positive_float, positive_int
from server.guard.keys import ApiKeys, read_keys_file
from server.guard.rate_limit import Limits
from server.load_progress import LoadProgress
from server.observability.request_log import configure_json_logging
from server.responses_api.store import StoreLimits
from server.settings import RequestLimits, ServerSettings
from server.tool_parsers import PARSERS

if TYPE_CHECKING:
    from engine.client import EngineClient

log = logging.getLogger("minerva.server")


def served_names(args: argparse.Namespace) -> list[list[str]]:
    """Each --served-model-name value as [served name, alias, ...] (`NAME,ALIAS,...`), every name distinct."""
    lists = [[name.strip() for name in value.split(",")] for value in args.served_model_name or []]
    flat = [name for names in lists for name in names]
    if not all(flat):
        raise LaunchError("--served-model-name: empty name (the form is NAME or NAME,ALIAS,...)")
    if len(set(flat)) != len(flat):
        raise LaunchError("--served-model-name values must be distinct (names and aliases alike)")
    return lists


def engine_configs(args: argparse.Namespace) -> list[EngineConfig]:
    """One EngineConfig per MODEL (none given: the `--config` file's model, else the default built-in)."""
    models = list(args.models) or [None]
    names = [names[0] for names in served_names(args)]
    if names and len(names) != len(models):
        raise LaunchError(f"--served-model-name given {len(names)} time(s) for {len(models)} model(s): "
                          "give one name per model, in the same order")
    configs = [engine_config(args, model, names[index] if names else None) for index, model in enumerate(models)]
    if sum(c.tensor_parallel_size > 1 for c in configs) > 1:
        raise LaunchError("only one model per server can be tensor-parallel (the ranks share one process group)")
    return configs


def build_engines(configs: list[EngineConfig], engine_process: bool = False) -> dict[str, EngineClient]:
    """served name -> its engine (with `engine_process`, a core process each); a model that cannot load raises
    its MinervaError, two under one name a LaunchError."""
    from engine.client import start_engine
    from engine.errors import EngineCoreError
    from engine.models.errors import ModelConfigError
    from engine.tokenizer import TokenizerError
    from server.serving import add_served

    engines: dict[str, EngineClient] = {}
    for config in configs:
        progress = None if engine_process else LoadProgress.for_terminal(config.model or "the default model")
        try:
            engine = start_engine(config, own_process=engine_process, on_progress=progress)
        except (ModelConfigError, TokenizerError, EngineCoreError) as exc:  # these name the field or file, not the model
            raise LaunchError(f"{config.model or 'the default model'}: {exc}") from exc
        finally:
            if progress is not None:
                progress.close()
        add_served(engines, config, engine)
    return engines


def cors_list(text: str) -> tuple[str, ...]:
    """A CORS flag's value: a JSON list as vLLM takes it ('["*"]'), or comma-separated ('a,b')."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise argparse.ArgumentTypeError("must be a JSON list of strings")
        return tuple(items)
    return tuple(item.strip() for item in text.split(",") if item.strip())


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The operator's flags as ServerSettings (checked before the models load; `device_name` is set once they
    have); a bad keys file or limit is a LaunchError."""
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
        responses_store = StoreLimits(max_items=args.responses_store_items,
                                      max_bytes=args.responses_store_mib * 1024 * 1024,
                                      ttl_seconds=args.responses_store_ttl)
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc
    rate_limits = Limits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                         max_concurrent_per_client=args.max_concurrent_per_key, max_pending=args.max_pending)
    return ServerSettings(api_keys=tuple(keys), protect_metrics=args.protect_metrics, rate_limits=rate_limits,
                          request_limits=request_limits, log_prompts=args.log_prompts,
                          allow_path_checks=args.allow_path_checks,
                          allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                          allowed_headers=args.allowed_headers, tool_call_parser=args.tool_call_parser,
                          model_aliases=tuple((alias, names[0]) for names in served_names(args) for alias in names[1:]),
                          fallback_model=args.fallback_model, responses_store=responses_store,
                          body_timeout_s=args.body_timeout, request_timeout_s=args.request_timeout)


def serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; then stop accepting, let running requests finish (or abort them
    after --shutdown-timeout seconds), shut the engines down and exit 0 (1 if an engine died: a
    tensor-parallel rank or the engine core process gone)."""
    from server.serving import defer_to_engine_cores, device_name, serve_app

    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise LaunchError("--ssl-keyfile and --ssl-certfile go together")
    configure_json_logging(args.log_level)
    configs = engine_configs(args)
    settings = server_settings(args)
    if args.api_server_count > 1:
        if not args.engine_process:
            raise LaunchError("--api-server-count needs the engine core in its own process (drop --no-engine-process)")
        from server.api_servers import serve_api_servers

        return serve_api_servers(args, configs, settings)
    engines = build_engines(configs, args.engine_process)
    if args.engine_process:
        defer_to_engine_cores()
    return serve_app(engines, dataclasses.replace(settings, device_name=device_name(engines)), args, banner=True)


def add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                                description="Serve models over an OpenAI-compatible HTTP API.")
    serve.add_argument("models", nargs="*", metavar="MODEL",
                       help="built-in model names (`minerva models`) or paths (.gguf, .safetensors, HF dir); "
                            "none = the default built-in model")
    serve.add_argument("--served-model-name", action="append", metavar="NAME[,ALIAS...]",
                       help="name clients use in `model` (repeat once per MODEL, in order); aliases after commas "
                            "are further names for the same model (e.g. the model ids an agent asks for)")
    serve.add_argument("--fallback-model", metavar="NAME",
                       help="answer requests for model names this server does not serve with this served model "
                            "(agents ask for their vendor's ids, e.g. Claude Code's claude-*); default: a 404")
    add_engine_flags(serve)

    http = serve.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--ssl-keyfile", metavar="FILE", help="serve HTTPS with this private key")
    http.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate")
    http.add_argument("--allowed-origins", type=cors_list, default=(), metavar="LIST",
                      help='CORS: browser origins allowed to call the server, e.g. \'["*"]\' or '
                           '"http://localhost:3000,https://app.example" (default: none)')
    http.add_argument("--allowed-methods", type=cors_list, default=("*",), metavar="LIST",
                      help="CORS: methods allowed from those origins (default: all)")
    http.add_argument("--allowed-headers", type=cors_list, default=("*",), metavar="LIST",
                      help="CORS: request headers allowed from those origins (default: all)")
    http.add_argument("--allow-path-checks", action="store_true",
                      help="let POST /v1/minerva/models/check read metadata of server-side file paths")
    http.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    http.add_argument("--log-prompts", action="store_true", help="put prompt text in the JSON request log")
    http.add_argument("--tool-call-parser", choices=sorted(PARSERS), default=None,
                      help="how tool calls are read from completions (default: picked from the chat template; "
                           "gpt-oss always uses harmony)")
    http.add_argument("--api-server-count", type=positive_int, default=1, metavar="N",
                      help="N API server processes accept on the one port, each with its own event loop and GIL, "
                           "against one engine core process per model; an API process "
                           "dying loses only its own connections (default 1)")
    http.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                      help="run each model's engine core (scheduler, model, output processing) in a process of its "
                           "own, so HTTP/SSE work never shares the step loop's GIL (measured: bench/host_ceiling.py); "
                           "the core dying ends every open stream with an error and the server exits 1; "
                           "--no-engine-process steps the engine in a thread of the server process (default: on)")
    http.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="on SIGTERM, how long running requests may finish before they end with an error")
    http.add_argument("--forwarded-allow-ips", metavar="LIST",
                      help="proxies (comma-separated IPs/networks, or *) whose X-Forwarded-For / X-Forwarded-Proto "
                           "are trusted for the client address (rate limits, logs); default: trust none")
    http.add_argument("--body-timeout", type=positive_float, default=ServerSettings.body_timeout_s, metavar="SECONDS",
                      help="a request body not fully received by then is a 408 (default %(default)s)")
    http.add_argument("--request-timeout", type=positive_float, metavar="SECONDS",
                      help="a generation request running longer is stopped (its engine work aborted) with a 504 "
                           "or, mid-stream, an error event (default: no limit)")

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
    store = serve.add_argument_group("stored responses (/v1/responses with store: true; per API key, LRU)")
    store_defaults = StoreLimits()
    store.add_argument("--responses-store-items", type=positive_int, default=store_defaults.max_items, metavar="N",
                       help=f"responses kept at most (default {store_defaults.max_items})")
    store.add_argument("--responses-store-mib", type=positive_int, default=store_defaults.max_bytes // 2**20,
                       metavar="MIB", help=f"their total size at most (default {store_defaults.max_bytes // 2**20})")
    store.add_argument("--responses-store-ttl", type=positive_int, default=int(store_defaults.ttl_seconds),
                       metavar="SECONDS", help=f"how long one is kept (default {int(store_defaults.ttl_seconds)})")
    serve.set_defaults(handler=serve_command)
