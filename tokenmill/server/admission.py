"""The bouncer: decides before anything is queued whether a request gets in.

Order: the model name, whether the request could ever fit (400, by the engine's own rules:
engine/request_validation.py), then access control (401 / 403 / 429, see access.py), then capacity
(503 with Retry-After). A request refused at capacity costs
nothing, and those already admitted keep their latency.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.server.access import AccessController
from tokenmill.server.metrics import ModelMetrics
from tokenmill.server.protocol import BadRequest
from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.server.refusal import Refusal

logger = logging.getLogger(__name__)


@dataclass
class CapacityLimits:
    max_num_queued_reqs: int  # requests running + queued
    max_num_queued_tokens: int  # prompt tokens waiting to be computed
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_num_queued_reqs < 1 or self.max_num_queued_tokens < 1:
            raise ValueError("max_num_queued_reqs and max_num_queued_tokens must be >= 1")


class Admission:
    def __init__(self, engine: AsyncLLMEngine, access: AccessController, limits: CapacityLimits,
                 metrics: ModelMetrics, served_model_names: list[str]) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.access = access
        self.limits = limits
        self.metrics = metrics
        self.served_model_names = served_model_names
        self.validator = engine.engine.validator  # the engine's rules: one place says what fits
        self.max_model_len = self.validator.max_model_len
        self.block_size = engine.engine.block_manager.block_size

    def check_model(self, name: str) -> None:
        if name not in self.served_model_names:
            raise BadRequest(f"the model {name!r} does not exist; this server serves "
                             f"{', '.join(repr(n) for n in self.served_model_names)}",
                             param="model", code="model_not_found", status=404)

    def admit(self, headers: Mapping[str, str], jobs: list[Any]) -> None:
        """Access control (from the request's HTTP headers or gRPC metadata), then capacity.
        Raises Refusal; counts every refusal by reason."""
        try:
            key = self.access.admit(headers.get("authorization"), headers,
                                    sum(len(j.prompt_ids) + j.params.max_tokens * j.params.n for j in jobs))
            self._check_capacity(jobs, key.key_id if key is not None else "anonymous")
        except Refusal as r:
            self.metrics.reject(r.reason)
            raise

    def _check_capacity(self, jobs: list[Any], key_id: str) -> None:
        if not self.engine.is_serving:
            raise Refusal(503, "capacity", "the engine is not serving", "engine_unavailable",
                          retry_after=self.limits.retry_after_s)
        in_system, queued_tokens, free_blocks, _running = self.engine.admission_view()
        new_tokens = sum(len(j.prompt_ids) * j.params.n for j in jobs)
        lim = self.limits
        # A request over a limit on its own would never get in: a 400 now, not 503s forever.
        if len(jobs) > lim.max_num_queued_reqs:
            raise InvalidRequest(f"the request carries {len(jobs)} prompts; this server queues at most "
                                 f"{lim.max_num_queued_reqs} requests (--max-num-queued-reqs)", "prompt")
        if new_tokens > lim.max_num_queued_tokens:
            raise InvalidRequest(f"the request's prompts come to {new_tokens} tokens; this server queues at most "
                                 f"{lim.max_num_queued_tokens} (--max-num-queued-tokens)", "prompt")
        reason = None
        if in_system + len(jobs) > lim.max_num_queued_reqs:
            reason = f"{in_system} requests in progress (limit {lim.max_num_queued_reqs})"
        elif queued_tokens + new_tokens > lim.max_num_queued_tokens:
            reason = f"{queued_tokens} prompt tokens queued (limit {lim.max_num_queued_tokens})"
        elif in_system and -(-(queued_tokens + new_tokens) // self.block_size) > free_blocks:
            # Others hold the pool and the queue already needs what is free: not soon.
            reason = "the KV cache is full"
        if reason is not None:
            logger.warning("refused request from key %r: at capacity (%s)", key_id, reason)
            raise Refusal(503, "capacity", f"the server is at capacity ({reason}); retry later",
                          "server_at_capacity", retry_after=lim.retry_after_s)
