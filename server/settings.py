"""What an operator sets for one server: who may call it, how much, and what gets logged."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.guard.rate_limit import Limits
from server.guard.request_limits import RequestLimits


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    protect_metrics: bool = False  # /metrics needs a key too
    rate_limits: Limits = field(default_factory=Limits)
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    log_prompts: bool = False  # prompt text in the request log
    allow_path_checks: bool = False  # /v1/minerva/models/check may read server-side paths
    device_name: str = "cpu"  # what the throughput estimate assumes by default
