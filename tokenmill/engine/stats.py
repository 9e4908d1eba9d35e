"""The numbers that describe load, kept every step: batch size and KV usage first."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from tokenmill.spec_decode.speculator import SpecDecodeStats


@dataclass
class EngineStats:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    batch_num_seqs: int = 0  # sequences in the last step's batch
    batch_num_tokens: int = 0  # tokens computed in the last step
    kv_blocks_used: int = 0  # held by running sequences
    kv_blocks_total: int = 0
    kv_blocks_cached: int = 0  # device blocks whose KV a new request could reuse
    spill_blocks_used: int = 0
    spill_blocks_total: int = 0
    prefix_cache_queries: int = 0  # cumulative tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # cumulative tokens found there (either tier)
    evictions: int = 0  # cached device blocks overwritten
    swaps_out: int = 0  # blocks copied to the spill tier
    swaps_in: int = 0  # blocks copied back instead of recomputed
    recomputed_tokens: int = 0  # tokens computed again because their cached KV was gone: the miss cost
    num_preemptions: int = 0  # cumulative
    prompt_tokens: int = 0  # cumulative prompt tokens computed (recomputation included)
    generation_tokens: int = 0  # cumulative tokens sampled
    num_steps: int = 0
    num_requests_finished: int = 0
    spec_decode: Optional["SpecDecodeStats"] = None  # with speculative decoding on

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
