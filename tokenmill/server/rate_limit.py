"""Per-key rate limits: requests and tokens per minute, as token buckets."""
from __future__ import annotations

import math
import threading
import time
from typing import Optional

from tokenmill.server.api_keys import KeyInfo, positive_or_none
from tokenmill.server.refusal import Refusal


class TokenBucket:
    """Holds up to a minute's worth of quota and refills continuously at rate/60 per second."""

    def __init__(self, rate_per_minute: float, now: float) -> None:
        positive_or_none("rate_per_minute", rate_per_minute)
        self.capacity = float(rate_per_minute)
        self.tokens = self.capacity
        self._per_second = self.capacity / 60.0
        self._last = now

    def _refill(self, now: float) -> None:
        # A clock that steps backwards must neither add nor remove quota.
        if now > self._last:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self._per_second)
            self._last = now

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0.0 now, inf never); takes nothing."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0; got {amount}")
        if amount > self.capacity:
            return math.inf
        self._refill(now)
        return 0.0 if self.tokens >= amount else (amount - self.tokens) / self._per_second

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + amount)

    def try_take(self, amount: float, now: float) -> float:
        """Take `amount` and return 0.0, or take nothing and return the wait (inf: never fits)."""
        wait = self.wait_time(amount, now)
        if wait == 0.0:
            self.tokens -= amount
        return wait


class RateLimiter:
    """Per-key requests/min and tokens/min buckets, created on a key's first request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[Optional[TokenBucket], Optional[TokenBucket]]] = {}

    def check(self, key: Optional[KeyInfo], num_tokens: int, now: Optional[float] = None) -> None:
        if key is None:
            return
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0; got {num_tokens}")
        now = time.monotonic() if now is None else now
        with self._lock:
            if key.key_id not in self._buckets:
                self._buckets[key.key_id] = (
                    TokenBucket(key.requests_per_minute, now) if key.requests_per_minute else None,
                    TokenBucket(key.tokens_per_minute, now) if key.tokens_per_minute else None)
            requests, tokens = self._buckets[key.key_id]
            if tokens is not None and num_tokens > tokens.capacity:
                raise Refusal(429, "rate_limit",
                              f"request needs {num_tokens} tokens but key {key.key_id!r} allows "
                              f"{tokens.capacity:g} tokens per minute, so it can never fit",
                              "rate_limit_exceeded")
            # Check both before taking from either, so a refused request costs nothing.
            waits = {"requests per minute": (requests, requests.wait_time(1, now) if requests else 0.0),
                     "tokens per minute": (tokens, tokens.wait_time(num_tokens, now) if tokens else 0.0)}
            hit = [(name, b, w) for name, (b, w) in waits.items() if w > 0]
            if hit:
                limits = " and ".join(f"{name} (limit {b.capacity:g})" for name, b, _ in hit)
                # Round away float noise (20.0000001s -> 20s), but never advise retrying at once.
                retry = max(1, math.ceil(max(w for _, _, w in hit) - 1e-6))
                raise Refusal(429, "rate_limit",
                              f"rate limit exceeded for key {key.key_id!r}: {limits}; retry after {retry}s",
                              "rate_limit_exceeded", retry_after=float(retry))
            if requests is not None:
                requests.try_take(1, now)
            if tokens is not None:
                tokens.try_take(num_tokens, now)

    def refund(self, key: Optional[KeyInfo], num_tokens: int) -> None:
        """Give back what check() took for a request refused after it (at capacity, or by a
        limit it could never meet): a request that never ran costs its key nothing."""
        if key is None:
            return
        with self._lock:
            requests, tokens = self._buckets.get(key.key_id, (None, None))
            if requests is not None:
                requests.give_back(1)
            if tokens is not None:
                tokens.give_back(num_tokens)
