"""Access control for the OpenAI-compatible server: API key, then client signature, then rate
limit (api_keys.py, signature.py, rate_limit.py).

Framework-free on purpose: the HTTP layer turns a `Refusal` into a response, so everything here is
testable without a server.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Mapping, Optional

from tokenmill.server import access_log
from tokenmill.server.api_keys import KeyInfo, KeyStore
from tokenmill.server.rate_limit import RateLimiter
from tokenmill.server.refusal import Refusal
from tokenmill.server.signature import SignaturePolicy

logger = logging.getLogger(__name__)


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
            try:
                key = self.keys.authenticate(authorization)
                key_id = key.key_id if key is not None else "anonymous"
            finally:
                record = access_log.current()  # the access log names the caller by key id, never by key
                if record is not None:
                    record.key_id = key_id
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
