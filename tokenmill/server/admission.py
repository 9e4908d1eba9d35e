"""The bouncer: decides before anything is queued whether a request gets in.

Order: the model name, whether the request could ever fit (400, by the engine's own rules:
engine/request_validation.py, and the hard limits below), then access control (401 / 403 / 429,
see access.py), then capacity (503 with Retry-After):
1. fair shares (fair_share.py): a key over its share while other keys are active is refused,
   whatever its requests' priority;
2. the hard limits: requests running + queued (--max-num-queued-reqs) and prompt tokens queued
   (--max-num-queued-tokens);
3. the expected wait (queue_wait.py): a request that cannot be expected to start within
   --max-queue-wait seconds is refused now rather than left to wait.
Retry-After comes from the same estimate: when the refused request would get in if nothing else
arrived. Under overload most requests are refused by precheck(), before their prompt is tokenized:
after authentication, when even the smallest request from that key would be refused (so then the
503 comes before a signature or rate-limit refusal). A request refused at capacity costs nothing, and those already admitted keep their latency.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import access_log
from tokenmill.server.access import AccessController
from tokenmill.server.fair_share import ANONYMOUS, RETURN_GRACE_S, FairShares
from tokenmill.server.load_probe import LoadProbe
from tokenmill.server.metrics import ModelMetrics
from tokenmill.server.protocol import BadRequest
from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.server.queue_wait import Forecast, Lengths, SeqLoad, ahead_of, forecast, retry_after
from tokenmill.server.refusal import Refusal

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE_WAIT_S = 5.0
# Retry-After when the estimate cannot say (nothing in view would free room): a minute, not forever.
UNKNOWN_RETRY_S = 60.0


@dataclass
class CapacityLimits:
    max_num_queued_reqs: int  # requests running + queued
    max_num_queued_tokens: int  # prompt tokens waiting to be computed
    max_queue_wait: float = DEFAULT_MAX_QUEUE_WAIT_S  # seconds a request may be expected to wait to start
    retry_after_s: float = 1.0  # while the engine is not serving

    def __post_init__(self) -> None:
        if self.max_num_queued_reqs < 1 or self.max_num_queued_tokens < 1:
            raise ValueError("max_num_queued_reqs and max_num_queued_tokens must be >= 1")
        if not self.max_queue_wait > 0:  # NaN fails this too
            raise ValueError(f"max_queue_wait must be a positive number of seconds; got {self.max_queue_wait}")

    @classmethod
    def defaults(cls, sched: Any, max_num_queued_reqs: Optional[int] = None,
                 max_num_queued_tokens: Optional[int] = None, max_queue_wait: Optional[float] = None
                 ) -> "CapacityLimits":
        """The limits for an engine's SchedulerConfig, each defaulting as the flags' help says.
        The queued-token backstop defaults to every queued request at full length: the wait
        estimate counts the queue's prefill time, so by default the token count never binds first."""
        # `is None`, not `or`: an explicit 0 is an error (__post_init__), not the default.
        reqs = 3 * sched.max_num_seqs if max_num_queued_reqs is None else max_num_queued_reqs  # batch + 2x queue
        tokens = reqs * sched.max_model_len if max_num_queued_tokens is None else max_num_queued_tokens
        return cls(reqs, tokens, DEFAULT_MAX_QUEUE_WAIT_S if max_queue_wait is None else max_queue_wait)


@dataclass
class _Smallest:
    """The least a request can ask for: what precheck() judges before the prompt is tokenized."""

    priority: int = 0
    request_id: str = "precheck"
    prompt_ids: tuple[int, ...] = (0,)
    params: Any = field(default_factory=lambda: SamplingParams(max_tokens=1))


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # called outside an event loop (offline use, tests)
        return None


def _whole_seconds(seconds: float) -> float:
    """A Retry-After: whole seconds, at least 1."""
    return float(max(1, math.ceil(seconds - 1e-9))) if math.isfinite(seconds) else UNKNOWN_RETRY_S


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
        self.blocks = engine.engine.block_manager
        self.block_size = self.blocks.block_size
        self.shares = FairShares(limits.max_num_queued_reqs, metrics.admitted_by_key)
        self.probe = LoadProbe(engine.engine)
        engine.step_listeners.append(self.probe.on_step)  # runs on the engine thread

    def check_model(self, name: str) -> None:
        if name not in self.served_model_names:
            raise BadRequest(f"the model {name!r} does not exist; this server serves "
                             f"{', '.join(repr(n) for n in self.served_model_names)}",
                             param="model", code="model_not_found", status=404)

    def admit(self, headers: Mapping[str, str], jobs: list[Any]) -> None:
        """Access control (from the request's HTTP headers or gRPC metadata), then capacity.
        Raises Refusal; counts every refusal by reason. Once admitted, each job is in the share
        book until `release(job.request_id)` (or until the Job is garbage-collected)."""
        tokens = sum(len(j.prompt_ids) + j.params.max_tokens * j.params.n for j in jobs)
        try:
            key = self.access.admit(headers.get("authorization"), headers, tokens)
        except Refusal as r:
            self.metrics.reject(r.reason)
            raise
        try:
            self._check_capacity(jobs, key.key_id if key is not None else ANONYMOUS,
                                 key.weight if key is not None else 1.0)
        except (Refusal, InvalidRequest) as r:
            self.access.limiter.refund(key, tokens)  # refused here, it used none of its key's quota
            if isinstance(r, Refusal):
                self.metrics.reject(r.reason)
            raise

    def precheck(self, headers: Mapping[str, str], priority: int = 0) -> None:
        """Before a request is tokenized: refuse it at once when even the smallest request (one
        prompt token, one output token) from its key, at its priority, would be refused at capacity;
        under overload that is most requests, and tokenizing a long prompt or rendering a chat
        template costs more than the rest of a refusal. A key that does not authenticate is left
        to admit(), which answers it in its order (401 first)."""
        try:
            key = self.access.keys.authenticate(headers.get("authorization"))
        except Refusal:
            return
        record = access_log.current()  # a refusal here is logged under the key's id, as admit()'s are
        if record is not None:
            record.key_id = key.key_id if key is not None else ANONYMOUS
        smallest = _Smallest(priority=priority)
        try:
            self._check_capacity([smallest], key.key_id if key is not None else ANONYMOUS,
                                 key.weight if key is not None else 1.0, enter=False)
        except Refusal as r:
            self.metrics.reject(r.reason)
            raise

    def release(self, *request_ids: str) -> None:
        """A request ended (finished, aborted, its client gone, failed): its share is free."""
        self.shares.release(*request_ids)

    def _release_soon(self, loop: Optional[asyncio.AbstractEventLoop], request_id: str) -> None:
        """A Job's finalizer. The garbage collector runs it in whatever thread allocates, at
        whatever point that thread is, maybe inside a lock the release needs (the metrics'):
        the release is handed to the event loop instead of being made here."""
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.shares.release, request_id)
                return
            except RuntimeError:  # the loop is closed: nothing else runs there any more
                pass
        self.shares.release(request_id)

    def _seqs(self, job: Any, lengths: Lengths, cached: int) -> tuple[SeqLoad, ...]:
        """The job's sequences as the estimate sees them; `cached`: its prompt tokens the prefix
        cache holds (a conversation's next turn mostly), which it will not prefill again. Each
        claims the blocks of its expected length (the prompt's full blocks once: the n sequences
        of a request share them), never more than the pool (the engine ends a sequence that
        outgrows the pool alone: it is admitted, not refused for ever)."""
        p, n_prompt = job.params, len(job.prompt_ids)
        room = self.max_model_len - n_prompt
        cap = min(p.max_tokens, room) if p.max_tokens is not None else room
        steps = lengths.steps_left(0, cap)
        claim = min(-(-(n_prompt + steps) // self.block_size), self.blocks.num_blocks)
        shared = n_prompt // self.block_size
        return tuple(SeqLoad(job.request_id, steps, claim if i == 0 else max(1, claim - shared),
                             n_prompt - cached if i == 0 else 0, job.priority)
                     for i in range(p.n))

    def _check_capacity(self, jobs: list[Any], key_id: str, weight: float, enter: bool = True) -> None:
        lim = self.limits
        if not self.engine.is_serving:
            raise Refusal(503, "capacity", "the engine is not serving", "engine_unavailable",
                          retry_after=lim.retry_after_s)
        new_tokens = sum(len(j.prompt_ids) * j.params.n for j in jobs)
        # A request over a limit on its own would never get in: a 400 now, not 503s forever.
        if len(jobs) > lim.max_num_queued_reqs:
            raise InvalidRequest(f"the request carries {len(jobs)} prompts; this server queues at most "
                                 f"{lim.max_num_queued_reqs} requests (--max-num-queued-reqs)", "prompt")
        if new_tokens > lim.max_num_queued_tokens:
            raise InvalidRequest(f"the request's prompts come to {new_tokens} tokens; this server queues at most "
                                 f"{lim.max_num_queued_tokens} (--max-num-queued-tokens)", "prompt")
        cached = [self.blocks.cached_prefix_tokens(j.prompt_ids) for j in jobs]
        now = time.monotonic()
        with self.shares.lock:  # the check and the entry of what it admits, as one step
            view = self.probe.view  # one reference read: the engine thread swaps in whole views
            seqs = [self._seqs(j, view.lengths, c) for j, c in zip(jobs, cached)]
            unseen = self.shares.unseen(view.ids)
            new = [s for group in seqs for s in group]
            fc = forecast(view, ahead_of(view, unseen, jobs[0].priority), new)
            # When the requests in progress end (the Retry-Afters of the count limits) needs the
            # whole queue; with priority scheduling the wait's forecast has only the part ahead.
            ends = forecast(view, ahead_of(view, unseen, math.inf), new) if view.by_priority else fc
            refused = self._refusal(jobs, key_id, weight, fc, ends, new_tokens,
                                    sum(s.prefill for s in view.waiting) + sum(s.prefill for s in unseen), now,
                                    view.measured)
            if refused is not None:
                reason, code, retry = refused
                # The key still wants its share when it comes back, but a long Retry-After must not
                # hold the other keys to their shares all that while, in case it never does.
                self.shares.note_refused(key_id, weight, now + min(retry, lim.max_queue_wait) + RETURN_GRACE_S)
                # DEBUG: the access log has the refusal's line already, and under overload a
                # warning per refused request would be most of the log.
                logger.debug("refused request from key %r: at capacity (%s); Retry-After %gs", key_id, reason, retry)
                raise Refusal(503, "capacity", f"the server is at capacity ({reason}); retry later", code,
                              retry_after=retry)
            if not enter:  # a precheck: nothing is admitted yet
                return
            logger.debug("admitted %d request(s) from key %r: expected to start in %.2f s", len(jobs), key_id,
                         fc.wait_s)
            loop = _running_loop()
            for job, group in zip(jobs, seqs):
                self.shares.add(key_id, weight, job.request_id, group)
                # A job whose stream never starts (its client left first) is released with it.
                weakref.finalize(job, self._release_soon, loop, job.request_id)

    def _refusal(self, jobs: list[Any], key_id: str, weight: float, fc: Forecast, ends: Forecast,
                 new_tokens: int, queued_tokens: int, now: float,
                 measured: bool) -> Optional[tuple[str, str, float]]:
        """(reason, error code, Retry-After) when the request must wait outside; None to admit.
        Until the engine has measured its steps (a fresh server's first turns) only the counts apply."""
        lim, n = self.limits, len(jobs)
        over = self.shares.over_share(key_id, weight, n, now)
        if over is not None:  # priority does not enter here: no priority buys past a share
            held, allowed = over
            due = ends.until_leave(held + n - allowed, self.shares.ids_of(key_id))
            return (f"key {key_id!r} has {held} requests in progress, its share of {allowed} while other keys "
                    "are active", "fair_share_exceeded", _whole_seconds(due))
        in_system = self.shares.total
        if in_system + n > lim.max_num_queued_reqs:
            return (f"{in_system} requests in progress (limit {lim.max_num_queued_reqs})", "server_at_capacity",
                    _whole_seconds(ends.until_leave(in_system + n - lim.max_num_queued_reqs, self.shares.ids())))
        if queued_tokens + new_tokens > lim.max_num_queued_tokens:
            return (f"{queued_tokens} prompt tokens queued (limit {lim.max_num_queued_tokens})", "server_at_capacity",
                    _whole_seconds(ends.until_prefilled(queued_tokens + new_tokens - lim.max_num_queued_tokens)))
        if measured and fc.wait_s > lim.max_queue_wait:
            wait = "never, as things stand" if not math.isfinite(fc.wait_s) else f"about {fc.wait_s:.1f} s"
            return (f"a new request would start in {wait}; the limit is {lim.max_queue_wait:g} s "
                    "(--max-queue-wait)", "server_at_capacity", retry_after(fc.wait_s, lim.max_queue_wait))
        return None
