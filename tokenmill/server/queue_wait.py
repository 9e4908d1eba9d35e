"""How long a new request can expect to wait before the engine starts it: the bouncer's estimate.

Pure arithmetic on a `LoadView` (what the engine held after its last loop turn, published by
load_probe.py on the engine thread), so it is unit-tested with made-up numbers.

The model (pessimistic where it cannot know: an admission that then waits past --max-queue-wait
is what the bouncer exists to prevent, while a refusal costs the client one retry):
- a sequence is expected to make as many tokens as those that finished lately did (`Lengths`:
  the mean of the measured lengths longer than what it has made so far, capped by its
  `max_tokens`; a sequence cut at its `max_tokens` counts as one that would have run to any cap,
  and with too few measured it is `max_tokens`), and it holds, at its end, the KV blocks of its
  prompt plus that expected length: its *claim* on the pool (at most the whole pool: the engine
  ends a sequence that outgrows the pool alone; the n sequences of a request share the prompt's
  full blocks);
- the queue is served in order, as the scheduler starts only its head (with priority scheduling
  the order is by priority: a request waits only behind those of equal or higher priority);
- a queued sequence starts once a batch slot (`max_num_seqs`) is free and the claims of those
  running leave room for its own; a request starts with its first sequence;
- time: one decode step with k sequences in the batch costs step_s + k x seq_s, and every prompt
  token prefilled costs prefill_s (the three fitted to the engine's recent turns).
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

# Measured lengths, longer than what a sequence has made so far, needed before they say more
# about it than its max_tokens does.
MIN_LENGTHS = 16


class SeqLoad(NamedTuple):
    """One sequence as the estimate sees it. A NamedTuple: the engine thread builds one per
    sequence every turn, and tuples are the cheapest immutable thing to hand across threads."""

    request_id: str
    steps: int  # decode steps it may still take (max_tokens left)
    blocks: int  # KV blocks it holds when it ends: its claim on the pool
    prefill: int  # prompt tokens it still has to compute (what the prefix cache holds is not)
    priority: int = 0


@dataclass(frozen=True)
class Lengths:
    """Output lengths of recently finished sequences, sorted; inf for one cut at its max_tokens
    (how far it would have gone is unknown, so it counts as going to any cap)."""

    values: tuple[float, ...] = ()
    prefix: tuple[float, ...] = (0.0,)  # prefix[i]: the sum of the first i (finite) values

    @classmethod
    def of(cls, lengths: Iterable[float]) -> "Lengths":
        values = tuple(sorted(lengths))
        prefix = [0.0]
        for v in values:
            if math.isfinite(v):
                prefix.append(prefix[-1] + v)
        return cls(values, tuple(prefix))

    def steps_left(self, done: int, cap: int) -> int:
        """Decode steps a sequence that has made `done` tokens, and may make `cap`, is expected to
        take still: the mean of min(L, cap) over the measured lengths L > done, less done."""
        if cap <= done:
            return 0
        lo = bisect.bisect_right(self.values, done)
        longer = len(self.values) - lo
        if longer < MIN_LENGTHS:
            return cap - done
        hi = bisect.bisect_right(self.values, cap)  # the infs sort last and exceed any cap
        total = self.prefix[hi] - self.prefix[lo] + (len(self.values) - hi) * cap
        return max(1, math.ceil(total / longer - done - 1e-9))


@dataclass(frozen=True)
class LoadView:
    """The engine's load after one loop turn. Immutable: the engine thread swaps in a new one."""

    running: tuple[SeqLoad, ...] = ()
    waiting: tuple[SeqLoad, ...] = ()  # in the scheduler's order (grammar-compiling ones last)
    ids: frozenset[str] = frozenset()  # every request the engine holds
    step_s: float = 0.0  # seconds a step costs whatever it computes
    seq_s: float = 0.0  # and per sequence decoding in it
    prefill_s: float = 0.0  # and per prompt token computed in it
    max_num_seqs: int = 1
    num_blocks: int = 1
    by_priority: bool = False
    measured: bool = False  # whether the costs come from this engine's turns (False: all zero)
    lengths: Lengths = Lengths()


@dataclass
class Forecast:
    """When the new request starts, and when the requests already in the system end."""

    wait_s: float  # until every new request has started (its first sequence; inf: never, as things stand)
    finish_s: dict[str, float] = field(default_factory=dict)  # request id -> expected end
    start_s: list[tuple[float, int]] = field(default_factory=list)  # (start, prompt tokens) of the queue ahead

    def until_leave(self, k: int, ids: Iterable[str] | None = None) -> float:
        """Seconds until k requests (of `ids`; default: any the forecast saw) have ended. 0 when
        k <= 0. One of `ids` the forecast did not see has ended already (the engine is done with
        it; its response is on its way out): it leaves at 0."""
        if k <= 0:
            return 0.0
        if ids is None:
            ends = sorted(self.finish_s.values())
        else:
            ends = sorted(self.finish_s.get(rid, 0.0) for rid in set(ids))
        return ends[k - 1] if k <= len(ends) else math.inf

    def until_prefilled(self, tokens: int) -> float:
        """Seconds until the queue ahead has started prompts of at least `tokens` tokens."""
        done = 0
        for t, n in self.start_s:
            done += n
            if done >= tokens:
                return t
        return math.inf


def ahead_of(view: LoadView, unseen: Iterable[SeqLoad], priority: int) -> list[SeqLoad]:
    """The queue a new request joins the back of: the engine's waiting sequences, then those
    admitted but not in the view yet; with priority scheduling only those ranking at or above it
    (ties go by arrival, and all of these arrived first)."""
    queue = list(view.waiting) + list(unseen)
    if view.by_priority:
        queue = sorted((s for s in queue if s.priority <= priority), key=lambda s: s.priority)  # stable
    return queue


def forecast(view: LoadView, ahead: list[SeqLoad], new: list[SeqLoad]) -> Forecast:
    """Simulate the batch as sequences end and free their slots and claims, starting the queue
    `ahead` and then `new`, in order; a clock in seconds advances with every step and prefill."""
    free_slots = view.max_num_seqs - len(view.running)
    free_blocks = view.num_blocks - sum(s.blocks for s in view.running)  # < 0: overcommitted
    ends = [(s.steps, s.blocks, s.request_id) for s in view.running]
    heapq.heapify(ends)
    step, clock = 0, sum(s.prefill for s in view.running) * view.prefill_s  # chunks still to run first
    finish: dict[str, float] = {}
    starts: list[float] = []

    def end_next() -> None:
        nonlocal step, clock, free_slots, free_blocks
        end, blocks, rid = heapq.heappop(ends)
        clock += (end - step) * (view.step_s + (len(ends) + 1) * view.seq_s)  # the batch as it was
        step = max(step, end)
        free_slots, free_blocks = free_slots + 1, free_blocks + blocks
        finish[rid] = clock  # a request ends with its last sequence: the latest assignment wins

    for seq in ahead + new:
        need = min(seq.blocks, view.num_blocks)  # alone, a sequence may have the whole pool
        while (free_slots < 1 or free_blocks < need) and ends:
            end_next()
        if free_slots < 1 or free_blocks < need:
            break  # only with no batch slot at all (max_num_seqs < 1): never
        starts.append(clock)  # its wait ends when it is scheduled; its own prefill is not part of it
        clock += seq.prefill * view.prefill_s
        heapq.heappush(ends, (step + seq.steps, need, seq.request_id))
        free_slots, free_blocks = free_slots - 1, free_blocks - need
    while ends:  # when everything admitted so far ends (with the new request in the batch)
        end_next()
    for seq in new:  # not in the system yet
        finish.pop(seq.request_id, None)
    start_s = [(t, s.prefill) for t, s in zip(starts, ahead)]
    # A new request starts with its first sequence (its first token comes then); several new
    # requests (a list of prompts) have all started once the last of them has.
    first: dict[str, float] = {}
    for seq, t in zip(new, starts[len(ahead):]):
        first.setdefault(seq.request_id, t)
    wait = max((first.get(s.request_id, math.inf) for s in new), default=0.0)
    return Forecast(wait, finish, start_s)


def retry_after(wait_s: float, max_queue_wait: float) -> float:
    """Seconds until a request refused with this estimated wait would be admitted if nothing else
    arrived: the wait beyond what is allowed, in whole seconds, at least 1 (a minute when the
    estimate sees nothing that would ever free room)."""
    if not math.isfinite(wait_s):
        return 60.0
    return float(max(1, math.ceil(wait_s - max_queue_wait - 1e-9)))
