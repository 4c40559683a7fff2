"""What an operator sets for one server: who may call it, how much, and what gets logged."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.guard.rate_limit import Limits
from server.responses_api.store import StoreLimits


@dataclass(frozen=True)
class RequestLimits:
    """Caps on what one request may ask for; server/guard/request_limits.py enforces them."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16  # also caps best_of (samples per prompt)
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_stop: int = 4  # stop strings, as OpenAI
    max_stop_length: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_logprobs: int = 20  # completion `logprobs` and chat `top_logprobs`
    max_messages: int = 512

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1 and not (name == "max_logprobs" and value == 0):
                raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    protect_metrics: bool = False  # /metrics needs a key too
    rate_limits: Limits = field(default_factory=Limits)
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    log_prompts: bool = False  # prompt text in the request log
    allow_path_checks: bool = False  # /v1/minerva/models/check may read server-side paths
    device_name: str = "cpu"  # what the throughput estimate assumes by default
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins that may call the server ("*": any); none by default
    allowed_methods: tuple[str, ...] = ("*",)  # CORS, once an origin is allowed
    allowed_headers: tuple[str, ...] = ("*",)
    tool_call_parser: str | None = None  # None: picked per model from its chat template and architecture
    model_aliases: tuple[tuple[str, str], ...] = ()  # (alias, served name): more names for one model
    fallback_model: str | None = None  # the served model unknown model names go to; None: they are a 404
    responses_store: StoreLimits = field(default_factory=StoreLimits)  # stored /v1/responses (store: true)
    body_timeout_s: float = 30.0  # a request body not complete by then is a 408 (it holds no slot meanwhile)
    request_timeout_s: float | None = None  # a generation request running longer is aborted: a 504 (None: no limit)
