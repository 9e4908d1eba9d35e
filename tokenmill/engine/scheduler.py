"""Continuous batching under a token budget.

vLLM's rule: "There's no decoding phase nor prefill phase." Each step hands out at most
`max_num_batched_tokens` tokens; a sequence scheduled for n tokens computes positions
[num_computed_tokens, num_computed_tokens + n). Running sequences go first (oldest first), then
waiting ones join while the budget, `max_num_seqs` and the KV pool allow. When the pool runs out,
the newest running sequence is preempted: its blocks are freed and it is recomputed later.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.kv_tiers import BlockCopy
from tokenmill.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from tokenmill.layers.sampler import SampledToken

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    """Which sequences run this step and how many of their tokens each computes, in batch order."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_preempted: int = 0
    block_copies: list[BlockCopy] = field(default_factory=list)  # run before the forward, in order

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: set[int]) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_priority_preemptions = 0  # of those, to admit a higher-priority request
        self._finished: list[Sequence] = []  # finished since the last update(), for the engine

    @property
    def by_priority(self) -> bool:
        return self.config.scheduling_policy == "priority"

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            self._insert_waiting(seq)
        else:
            self.waiting.append(seq)

    def _insert_waiting(self, seq: Sequence) -> None:
        """Into the queue at its priority (bisect by key: O(log n) to find, O(n) to insert)."""
        keys = [q.priority_key for q in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.priority_key), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):  # a snapshot: preemption takes sequences out of running
            if budget <= 0:
                break
            if seq not in self.running:  # preempted to make room for one scheduled before it
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._make_room(seq, n, out):
                out.scheduled.append((seq, n))
                out.num_batched_tokens += n
            budget = self.config.max_num_batched_tokens - out.num_batched_tokens
        # NOTE: after a preemption nothing new is admitted this step: the pool is tight.
        while (not out.num_preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            hit = self.block_manager.find_prefix(seq)
            cached = hit.num_blocks() * self.block_manager.block_size
            n = min(seq.num_tokens - seq.num_computed_tokens - cached, budget)
            if not self.block_manager.allocate_slots(seq, n, hit):
                given_back = self._preempt_for(seq, out) if self.by_priority else None
                if given_back is not None:
                    budget += given_back
                    continue  # look again, with the blocks (and budget) of what was preempted
                if not self.running:
                    # Nothing holds blocks, yet this sequence does not fit: it never will.
                    self.waiting.popleft()
                    self._finish(seq, "length")
                    logger.warning("request %s needs more KV blocks than the pool has; finished early",
                                   seq.request.request_id)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        # Proposals come last, after every running sequence's own tokens and every admission:
        # verifying them is worth less than another sequence's decode or a waiting prompt, so
        # they take only the budget and blocks left (they never cost a preemption or a wait).
        self._add_proposals(out, budget)
        out.num_batched_tokens = sum(n for _, n in out.scheduled)
        out.block_copies = self.block_manager.take_copies()
        return out

    def _add_proposals(self, out: SchedulerOutput, budget: int) -> int:
        """Extend each scheduled decode with its proposed tokens (the verification computes
        them too) as far as the budget and the free blocks allow, in batch order; a proposal
        never costs a preemption. Returns the tokens added."""
        added = 0
        for i, (seq, n) in enumerate(out.scheduled):
            if not seq.spec_token_ids:
                continue
            drafts = seq.spec_token_ids[:max(0, budget - added)] if n == 1 else []
            while drafts and not self.block_manager.can_allocate(seq, 1 + len(drafts)):
                drafts = drafts[:-1]
            if drafts:
                self.block_manager.allocate_slots(seq, 1 + len(drafts))
                out.scheduled[i] = (seq, 1 + len(drafts))
                added += len(drafts)
            seq.spec_token_ids = drafts
            if not drafts:
                seq.spec_probs = None
        return added

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocate slots for the running seq, preempting running sequences until it fits: the
        newest first (fcfs), or the lowest priority first, the newest among equals (priority;
        one scheduled earlier this step is taken out of it). False if seq itself was preempted
        (or finished: alone in the pool and still short)."""
        while not self.block_manager.allocate_slots(seq, n):
            if len(self.running) == 1:
                # Alone in the pool and still short: preempting itself would loop forever.
                self.running.pop()
                self._finish(seq, "length")
                logger.warning("request %s outgrew the whole KV pool; finished early",
                               seq.request.request_id)
                return False
            if self.by_priority:
                victim = max(self.running, key=lambda q: q.priority_key)
                self.running.remove(victim)
                if any(q is victim for q, _ in out.scheduled):
                    out.num_batched_tokens -= next(m for q, m in out.scheduled if q is victim)
                    out.scheduled = [(q, m) for q, m in out.scheduled if q is not victim]
            else:
                victim = self.running.pop()
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        return True

    def _preempt_for(self, seq: Sequence, out: SchedulerOutput) -> Optional[int]:
        """Priority scheduling: preempt the lowest-priority running sequence if it ranks below
        the waiting `seq` (taking it out of this step if it was scheduled). Returns the token
        budget that gives back, or None when nothing ranks below seq."""
        lower = [q for q in self.running if q.priority_key > seq.priority_key]
        if not lower:
            return None
        victim = max(lower, key=lambda q: q.priority_key)
        given_back = sum(n for q, n in out.scheduled if q is victim)
        out.scheduled = [(q, n) for q, n in out.scheduled if q is not victim]
        self.running.remove(victim)
        self._preempt(victim)
        self.num_priority_preemptions += 1
        logger.debug("preempted %r for higher-priority %r", victim, seq)
        return given_back

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids, seq.spec_probs = [], None  # proposed for a step that will not run
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self._insert_waiting(seq)
        else:
            self.waiting.appendleft(seq)
        logger.debug("preempted %r", seq)

    def update(self, out: SchedulerOutput, sampled: dict[int, list[SampledToken]]) -> list[Sequence]:
        """Advance computed tokens, append sampled tokens, apply stop rules; return newly finished.

        A sequence that verified k proposed tokens gets 1..k+1 tokens: the accepted proposals
        and the one after them. Its KV is valid up to the last accepted one; the slots written
        for rejected proposals lie past num_computed_tokens, are never read, and are written
        over as the sequence grows (its blocks stay its own, so nothing leaks)."""
        for seq, n in out.scheduled:
            if seq.is_finished:  # aborted while the step ran
                continue
            pending = seq.num_tokens - seq.num_computed_tokens  # tokens without KV before the step
            seq.spec_token_ids, seq.spec_probs = [], None
            if n < pending:  # a prompt chunk; nothing sampled yet
                seq.num_computed_tokens += n
                self.block_manager.cache_full_blocks(seq)
                continue
            computed = seq.num_computed_tokens + pending
            for i, tok in enumerate(sampled[seq.seq_id]):
                # KV holds every token before this one: the pending ones and the proposals
                # accepted so far (each emitted token but the last is an accepted proposal).
                seq.num_computed_tokens = computed + i
                if seq.grammar is not None and not seq.grammar.accept(tok.token_id):
                    # The sampler masks what the grammar refuses, so this is a bug; the token is dropped.
                    self._finish(seq, "error", f"the grammar refused token {tok.token_id}")
                    break
                seq.append_token(tok.token_id, tok.logprob, tok.top_logprobs)
                self._check_stop(seq, tok.token_id)
                if seq.is_finished:  # tokens past a stop are dropped
                    break
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq)
        finished, self._finished = self._finished, []
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        p = seq.params
        # NOTE: min_tokens holds back every stop rule, stop strings included (vLLM's semantics).
        enough = seq.num_output_tokens >= p.min_tokens
        stop_str = seq.detokenizer.append(token_id, enough) if seq.detokenizer is not None else None
        if stop_str is not None:
            self._finish(seq, "stop", stop_str)
        elif seq.grammar is not None and seq.grammar.is_terminated:
            self._finish(seq, "stop")  # the grammar is complete (its EOS, if any, accepted)
        elif not p.ignore_eos and token_id in self.eos_token_ids and enough:
            self._finish(seq, "stop")
        elif token_id in p.stop_token_ids and enough:
            self._finish(seq, "stop", token_id)
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            self._finish(seq, "length")
        elif seq.num_tokens >= self.config.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: Optional[int | str] = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.request.metrics.finished_time = time.time()
        self._finished.append(seq)
        self.block_manager.cache_full_blocks(seq)  # what it computed stays reusable after it
        if seq.detokenizer is not None and not isinstance(stop_reason, str):
            seq.detokenizer.flush()
        self.block_manager.free(seq)

    def abort(self, seqs: list[Sequence], reason: str = "abort", message: Optional[str] = None) -> None:
        """Finish seqs now, wherever they are ("error" with a message: the engine failed them);
        the next update() returns them."""
        for seq in seqs:
            if seq.is_finished:
                continue
            if seq in self.waiting:
                self.waiting.remove(seq)
            if seq in self.running:
                self.running.remove(seq)
            self._finish(seq, reason, message)
