"""API keys: who a key belongs to and its quotas. Secret keys live only in `KeyStore`'s lookup dict
(as sha256 digests); everything else, logs included, uses key ids."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.server.refusal import Refusal
from tokenmill.server.signature import SignaturePolicy

_BEARER = "bearer "


def positive_or_none(name: str, value: Any) -> None:
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
    # Its share of the server's capacity relative to the other keys' (admission.py: fair shares).
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, str) or not self.key_id:
            raise ValueError(f"key id must be a non-empty string; got {self.key_id!r}")
        positive_or_none("requests_per_minute", self.requests_per_minute)
        positive_or_none("tokens_per_minute", self.tokens_per_minute)
        if self.weight is None:
            raise ValueError("weight must be a positive number; got None")
        positive_or_none("weight", self.weight)
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
            unknown = set(entry) - {"id", "key", "requests_per_minute", "tokens_per_minute", "signature", "weight"}
            if unknown:
                raise ValueError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
            for name in ("id", "key"):
                if not isinstance(entry.get(name), str) or not entry[name]:
                    raise ValueError(f"{where}: '{name}' is required and must be a non-empty string")
            try:
                sig = entry.get("signature")
                info = KeyInfo(entry["id"], entry.get("requests_per_minute"), entry.get("tokens_per_minute"),
                               SignaturePolicy.from_dict(sig) if sig is not None else None,
                               weight=entry.get("weight", 1.0))
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
