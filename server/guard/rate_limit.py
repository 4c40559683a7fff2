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
    """Refused (HTTP 429); retry after `retry_after` seconds, or None when waiting cannot help."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))


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
        """Remove `amount` tokens; the level may go below zero (a debt later requests wait out)."""
        self._refill()
        self.tokens -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self.tokens = min(self.capacity, self.tokens + amount)

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity


@dataclass
class Limits:
    """None switches a limit off; a client is an API key id, or an address without keys."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_per_client: int | None = None  # generation requests in flight per client
    max_pending: int | None = None  # generation requests in flight server-wide, until their last byte


class Admission:
    """Decides, per request, whether it may enter the engine now."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}
        self.pending = 0
        self._sweep_at = _FIRST_SWEEP

    def _bucket(self, table: dict[str, TokenBucket], client: str, capacity: int) -> TokenBucket:
        if client not in table:
            if len(self._requests) + len(self._tokens) >= self._sweep_at:
                self._sweep()
            table[client] = TokenBucket(capacity, clock=self._clock)
        return table[client]

    def _sweep(self) -> None:
        """Forget clients whose buckets have refilled: a fresh bucket is the same, so memory stays
        bounded by the clients active within about a minute, however many addresses come by."""
        for table in (self._requests, self._tokens):
            for client in [c for c, bucket in table.items() if bucket.full and c not in self._in_flight]:
                del table[client]
        self._sweep_at = max(_FIRST_SWEEP, 2 * (len(self._requests) + len(self._tokens)))

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
        """Reserve `tokens` against the per-minute token rate (settle_tokens squares it afterwards)."""
        tpm = self.limits.tokens_per_minute
        if tpm is None:
            return
        bucket = self._bucket(self._tokens, client, tpm)
        wait = bucket.wait_time(tokens)
        if math.isinf(wait):
            raise RateLimitError(f"Request too large: {tokens} tokens (prompt + max_tokens) exceed the limit of "
                                 f"{tpm} tokens per minute; lower max_tokens or n.", None)
        if wait > 0:
            raise RateLimitError(f"Rate limit reached: {tpm} tokens per minute.", wait)
        bucket.take(tokens)

    def settle_tokens(self, client: str, reserved: int, used: int) -> None:
        """Once a request ends: give back what it reserved and did not use, or charge what it used beyond."""
        if self.limits.tokens_per_minute is None or reserved == used:
            return
        bucket = self._bucket(self._tokens, client, self.limits.tokens_per_minute)
        if used < reserved:
            bucket.give_back(reserved - used)
        else:
            bucket.take(used - reserved)

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
        """Release the slot `enter` gave this client."""
        count = self._in_flight.get(client, 0)
        if count == 0:
            raise RuntimeError(f"leave({client!r}) without a matching enter")
        self.pending -= 1
        if count > 1:
            self._in_flight[client] = count - 1
        else:
            del self._in_flight[client]


# Client tables are swept for refilled buckets once they hold this many (then twice the survivors).
_FIRST_SWEEP = 4096
