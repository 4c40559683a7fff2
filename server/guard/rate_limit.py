"""Per-client request and token rates (token buckets) and concurrency caps, all in memory.

A client is its API key id, or its address when the server runs without keys.
Refusals are immediate: nothing queues in the server beyond the caps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class RateLimitError(Exception):
    """Refused for now (HTTP 429); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class OverloadedError(Exception):
    """The server's waiting room is full (HTTP 503)."""


@dataclass
class TokenBucket:
    """Holds up to `capacity` tokens, refilled continuously at `capacity` per minute."""

    capacity: float
    tokens: float = field(init=False)
    updated: float = field(init=False)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self.updated = self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` tokens are there (0 if now); inf if never."""
        self._refill()
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.tokens) * 60.0 / self.capacity)

    def take(self, amount: float) -> None:
        self._refill()
        self.tokens -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + amount)


@dataclass
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_per_client: int | None = None
    max_pending: int | None = None  # requests admitted server-wide (running + waiting)


class Admission:
    """Decides, per request, whether it may enter the engine now."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}
        self.pending = 0

    def _bucket(self, table: dict[str, TokenBucket], client: str, capacity: int) -> TokenBucket:
        if client not in table:
            table[client] = TokenBucket(capacity, clock=self._clock)
        return table[client]

    def check_request(self, client: str) -> None:
        """Count one request against the client's per-minute rate, or raise RateLimitError."""
        rpm = self.limits.requests_per_minute
        if rpm is None:
            return
        bucket = self._bucket(self._requests, client, rpm)
        wait = bucket.wait_time(1)
        if wait > 0:
            raise RateLimitError(f"Rate limit reached: {rpm} requests per minute.", wait)
        bucket.take(1)

    def check_tokens(self, client: str, tokens: int) -> None:
        """Reserve `tokens` (prompt + max completion) against the per-minute token rate."""
        tpm = self.limits.tokens_per_minute
        if tpm is None:
            return
        bucket = self._bucket(self._tokens, client, tpm)
        wait = bucket.wait_time(tokens)
        if math.isinf(wait):
            raise RateLimitError(
                f"Request too large: {tokens} tokens (prompt + max_tokens) exceed the limit of {tpm} tokens per minute.",
                60,
            )
        if wait > 0:
            raise RateLimitError(f"Rate limit reached: {tpm} tokens per minute.", wait)
        bucket.take(tokens)

    def refund_tokens(self, client: str, tokens: int) -> None:
        """Give back the reserved tokens a request did not use."""
        if self.limits.tokens_per_minute is not None and tokens > 0 and client in self._tokens:
            self._tokens[client].give_back(tokens)

    def enter(self, client: str) -> None:
        """Admit one in-flight request, or refuse at once (429 per client, 503 server-wide)."""
        cap = self.limits.max_concurrent_per_client
        if cap is not None and self._in_flight.get(client, 0) >= cap:
            raise RateLimitError(f"Too many concurrent requests: at most {cap} per client.", 1)
        if self.limits.max_pending is not None and self.pending >= self.limits.max_pending:
            raise OverloadedError(
                f"Server overloaded: {self.pending} requests in progress (limit {self.limits.max_pending}). Retry later."
            )
        self._in_flight[client] = self._in_flight.get(client, 0) + 1
        self.pending += 1

    def leave(self, client: str) -> None:
        self.pending -= 1
        left = self._in_flight.get(client, 1) - 1
        if left:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)
