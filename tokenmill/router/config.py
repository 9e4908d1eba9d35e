"""The router's settings, one dataclass checked where it is built (the command line or a test)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

POLICIES = ("cache-aware", "least-load", "round-robin")


@dataclass
class RouterConfig:
    policy: str = "cache-aware"
    # The router's own region: requests without an x-tokenmill-region header prefer it.
    region: Optional[str] = None
    # SGLang's router defaults: follow the cache when at least half of the prompt is known to be
    # cached on a replica, unless the fleet is imbalanced by more than 32 requests and 1.5x.
    cache_threshold: float = 0.5
    balance_abs_threshold: float = 32.0
    balance_rel_threshold: float = 1.5
    # A replica with waiting requests and this much of its KV cache held is tried last.
    kv_full_threshold: float = 0.95
    # Characters per prefix-index chunk: about one 16-token KV block of English text.
    chunk_chars: int = 64
    # Chunks the prefix index remembers (LRU); ~100 bytes each, so 200k is ~20 MB.
    max_index_chunks: int = 200_000
    # Health and load are polled this often; a check slower than health_timeout_s fails.
    health_interval_s: float = 0.5
    health_timeout_s: float = 1.0
    # A dead host refuses at once; a black-holed one is given this long to accept.
    connect_timeout_s: float = 2.0
    # Longest wait for any read from a replica: a non-streamed reply comes whole after its last
    # token, so this bounds a whole generation.
    upstream_timeout_s: float = 600.0
    # How often a --replicas-file is re-read and --replicas-dns names are resolved again.
    discovery_interval_s: float = 5.0
    # The same keys as the replicas' (--api-key, --api-keys-file): a request with a bad key is
    # refused at the router, before it costs a replica anything.
    api_key: Optional[str] = field(default=None, repr=False)
    api_keys_file: Optional[str] = None
    # Retry-After the router sends when it has no replica to offer and none said when to retry.
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1]; got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0; got {self.balance_abs_threshold}")
        if self.balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1; got {self.balance_rel_threshold}")
        if not 0.0 < self.kv_full_threshold <= 1.0:
            raise ValueError(f"kv_full_threshold must be in (0, 1]; got {self.kv_full_threshold}")
        if self.chunk_chars < 1 or self.max_index_chunks < 1:
            raise ValueError("chunk_chars and max_index_chunks must be >= 1")
        for name in ("health_interval_s", "health_timeout_s", "connect_timeout_s", "upstream_timeout_s",
                     "discovery_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0; got {self.retry_after_s}")
