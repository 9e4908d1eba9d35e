"""Access control for the OpenAI-compatible server: API keys, rate limits, client signatures.

Framework-free on purpose: the HTTP layer turns a `Refusal` into a response with
`to_openai_body()`, so everything here is testable without a server. Secret keys live only
in `KeyStore`'s lookup dict (as sha256 digests); everything else, logs included, uses key ids.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from tokenmill.server.errors import ERROR_TYPES, error_body

logger = logging.getLogger(__name__)

REASONS = ("auth", "rate_limit", "signature", "capacity", "bad_request")
_BEARER = "bearer "


class Refusal(Exception):
    """A request turned away before it reaches the engine; maps onto one HTTP error response."""

    def __init__(self, status: int, reason: str, message: str, code: str,
                 err_type: Optional[str] = None, retry_after: Optional[float] = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"Refusal reason must be one of {', '.join(REASONS)}; got {reason!r}")
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.code = code
        self.err_type = err_type or ERROR_TYPES.get(status, "server_error")
        self.retry_after = retry_after

    def to_openai_body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.err_type, code=self.code)


def _short(text: str, limit: int = 80) -> str:
    # repr() escapes control characters, so client-supplied text cannot forge log lines.
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass
class SignaturePolicy:
    """What a legitimate client's requests look like (e.g. the official SDK's headers)."""

    required_headers: list[str] = field(default_factory=list)
    user_agent_patterns: list[str] = field(default_factory=list)
    action: str = "log"
    _compiled: list[re.Pattern[str]] = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.action not in ("log", "block"):
            raise ValueError(f"signature policy action must be 'log' or 'block'; got {self.action!r}")
        for name, values in (("required_headers", self.required_headers),
                             ("user_agent_patterns", self.user_agent_patterns)):
            if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"signature policy {name} must be a list of non-empty strings; got {values!r}")
        self.required_headers = [h.strip().lower() for h in self.required_headers]
        self._compiled = []
        for pattern in self.user_agent_patterns:
            try:
                self._compiled.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"signature policy user_agent_patterns: bad regex {pattern!r}: {e}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SignaturePolicy":
        if not isinstance(d, Mapping):
            raise ValueError(f"signature policy must be a JSON object; got {type(d).__name__}")
        unknown = set(d) - {"required_headers", "user_agent_patterns", "action"}
        if unknown:  # a typo here would silently disable the check, so reject it
            raise ValueError(f"signature policy has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def check(self, headers: Mapping[str, str]) -> Optional[str]:
        """None when the request matches, else a short reason for the log."""
        lower = {k.lower(): v for k, v in headers.items()}
        for name in self.required_headers:
            if name not in lower:
                return f"missing header {name}"
        if self._compiled:
            ua = lower.get("user-agent")
            if ua is None:
                return "missing header user-agent"
            if not any(p.search(ua) for p in self._compiled):
                return f"user-agent {_short(ua)} matches no allowed pattern"
        return None


def _positive_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    # bool is an int subclass; `true` in a JSON file is a mistake, not a quota of 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number or null; got {value!r}")


@dataclass
class KeyInfo:
    """Who a key belongs to and what it may do. Holds no secret."""

    key_id: str
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    signature: Optional[SignaturePolicy] = None

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not self.key_id:
            raise ValueError(f"key id must be a non-empty string; got {self.key_id!r}")
        _positive_or_none("requests_per_minute", self.requests_per_minute)
        _positive_or_none("tokens_per_minute", self.tokens_per_minute)
        if self.signature is not None and not isinstance(self.signature, SignaturePolicy):
            raise ValueError(f"signature must be a SignaturePolicy; got {type(self.signature).__name__}")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyStore:
    """API keys by sha256 digest: a dict lookup of a digest does not leak the key through timing."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, KeyInfo] = {}
        self._ids: set[str] = set()

    def add(self, key: str, info: KeyInfo) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"API key for {info.key_id!r} must be a non-empty string")
        if info.key_id in self._ids:
            raise ValueError(f"duplicate API key id {info.key_id!r}")
        digest = _digest(key)
        if digest in self._by_digest:
            raise ValueError(f"API key for {info.key_id!r} is already used by {self._by_digest[digest].key_id!r}")
        self._by_digest[digest] = info
        self._ids.add(info.key_id)

    @classmethod
    def from_config(cls, api_key: Optional[str], api_keys_file: Optional[str]) -> "KeyStore":
        store = cls()
        if api_key is not None:
            store.add(api_key, KeyInfo("default"))
        if api_keys_file is not None:
            store._load_file(api_keys_file)
        return store

    def _load_file(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read API keys file {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError(f"API keys file {path} must be a JSON object with a 'keys' list")
        for i, entry in enumerate(data["keys"]):
            where = f"API keys file {path}, entry {i}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: must be a JSON object")
            if isinstance(entry.get("id"), str):
                where += f" (id {entry['id']!r})"
            unknown = set(entry) - {"id", "key", "requests_per_minute", "tokens_per_minute", "signature"}
            if unknown:
                raise ValueError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
            for name in ("id", "key"):
                if not isinstance(entry.get(name), str) or not entry[name]:
                    raise ValueError(f"{where}: '{name}' is required and must be a non-empty string")
            try:
                sig = entry.get("signature")
                info = KeyInfo(entry["id"], entry.get("requests_per_minute"), entry.get("tokens_per_minute"),
                               SignaturePolicy.from_dict(sig) if sig is not None else None)
                self.add(entry["key"], info)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from None

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: Optional[str]) -> Optional[KeyInfo]:
        """The caller's KeyInfo; None when auth is disabled. Messages never echo the key."""
        if not self.enabled:
            return None
        if not authorization:
            raise Refusal(401, "auth", "missing Authorization header; expected 'Bearer <api key>'",
                          "invalid_api_key")
        if authorization[:len(_BEARER)].lower() != _BEARER or not authorization[len(_BEARER):].strip():
            raise Refusal(401, "auth", "malformed Authorization header; expected 'Bearer <api key>'",
                          "invalid_api_key")
        info = self._by_digest.get(_digest(authorization[len(_BEARER):].strip()))
        if info is None:
            raise Refusal(401, "auth", "invalid API key", "invalid_api_key")
        return info


class TokenBucket:
    """Holds up to a minute's worth of quota and refills continuously at rate/60 per second."""

    def __init__(self, rate_per_minute: float, now: float) -> None:
        _positive_or_none("rate_per_minute", rate_per_minute)
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


class AccessController:
    """authenticate -> client signature -> rate limit, logging every refusal by key id."""

    def __init__(self, keys: KeyStore, limiter: RateLimiter, signature: Optional[SignaturePolicy]) -> None:
        self.keys = keys
        self.limiter = limiter
        self.signature = signature
        self.signature_mismatches = 0
        self._lock = threading.Lock()

    @classmethod
    def from_args(cls, api_key: Optional[str], api_keys_file: Optional[str],
                  signature_policy_file: Optional[str]) -> "AccessController":
        keys = KeyStore.from_config(api_key, api_keys_file)
        policy = None
        if signature_policy_file is not None:
            try:
                with open(signature_policy_file, encoding="utf-8") as f:
                    policy = SignaturePolicy.from_dict(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"signature policy file {signature_policy_file}: {e}") from None
        logger.info("API key auth %s (%d keys); global signature policy %s",
                    "enabled" if keys.enabled else "disabled", len(keys),
                    f"action={policy.action}" if policy else "off")
        return cls(keys, RateLimiter(), policy)

    def admit(self, authorization: Optional[str], headers: Mapping[str, str],
              num_tokens: int) -> Optional[KeyInfo]:
        key_id = "unknown"  # until authentication tells us who is calling
        try:
            key = self.keys.authenticate(authorization)
            key_id = key.key_id if key is not None else "anonymous"
            policy = key.signature if key is not None and key.signature is not None else self.signature
            mismatch = policy.check(headers) if policy is not None else None
            if mismatch is not None:
                with self._lock:
                    self.signature_mismatches += 1
                logger.warning("client signature mismatch for key %r: %s (action=%s)",
                               key_id, mismatch, policy.action)
                if policy.action == "block":
                    # The client is not told which check failed; that would show how to forge it.
                    raise Refusal(403, "signature", "request does not match the required client signature",
                                  "client_signature_mismatch")
            self.limiter.check(key, num_tokens)
            return key
        except Refusal as r:
            logger.warning("refused request for key %r: %s %s: %s", key_id, r.status, r.reason, r.message)
            raise
