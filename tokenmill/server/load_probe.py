"""The bouncer's eyes on the engine: after every loop turn, on the engine thread (the only one
that may read the scheduler), a `LoadView` of what runs and what waits and what a step costs,
published by swapping one reference (so the event loop never sees a half-built view);
queue_wait.py does the arithmetic on it."""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Optional

import numpy as np

from tokenmill.server.queue_wait import Lengths, LoadView, SeqLoad

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.engine.sequence import Sequence

logger = logging.getLogger(__name__)

# Turns the costs are fitted over: a few seconds of a busy engine, so the fit follows the
# machine (a shared CPU slows down and speeds up) without jumping on one slow turn.
WINDOW = 64
MIN_TURNS = 8  # before this many measured turns the costs are unknown (the wait rule waits for them)
LENGTHS = 256  # finished sequences whose output lengths the expected lengths come from
# Scales that make the three columns of the fit comparable (1, decoding sequences, prompt tokens).
_SEQ_UNIT, _TOKEN_UNIT = 16.0, 1024.0


def fit_costs(turns: "deque[tuple[float, float, float]]") -> tuple[float, float, float]:
    """(per step, per decoding sequence, per prompt token) seconds, least squares over the turns
    (decoding sequences, prompt tokens, seconds), each >= 0. A small ridge keeps it defined when
    the turns do not vary (every one at the same batch): the split is then arbitrary, but the cost
    of a turn like the measured ones, which is what the estimate mostly needs, is still right."""
    a = np.array([(1.0, k / _SEQ_UNIT, p / _TOKEN_UNIT) for k, p, _ in turns])
    y = np.array([t for _, _, t in turns])
    theta = np.linalg.solve(a.T @ a + 1e-4 * len(turns) * np.eye(3), a.T @ y)
    if (theta < 0).any():  # noise: refit without the columns that came out negative
        keep = theta > 0
        theta = np.zeros(3)
        if keep.any():
            sub = a[:, keep]
            theta[keep] = np.linalg.solve(sub.T @ sub + 1e-4 * len(turns) * np.eye(int(keep.sum())), sub.T @ y)
        theta = np.maximum(theta, 0.0)
    return float(theta[0]), float(theta[1]) / _SEQ_UNIT, float(theta[2]) / _TOKEN_UNIT


class LoadProbe:
    def __init__(self, engine: LLMEngine) -> None:
        sched = engine.scheduler_config
        self.block_size = engine.block_manager.block_size
        self._blocks = engine.block_manager
        self.max_model_len = sched.max_model_len
        self.turns: deque[tuple[float, float, float]] = deque(maxlen=WINDOW)
        self.costs = (0.0, 0.0, 0.0)
        self._lengths: deque[float] = deque(maxlen=LENGTHS)
        self.lengths = Lengths()
        self._running: list[Sequence] = []  # the batch at the end of the last turn
        self._prompt_tokens = engine.stats.prompt_tokens
        self._last_end: Optional[float] = None  # end of the previous turn, if the engine had work then
        self._base = LoadView(max_num_seqs=sched.max_num_seqs, num_blocks=engine.block_manager.num_blocks,
                              by_priority=sched.scheduling_policy == "priority")
        self.view = self._base
        self._failed = False

    def on_step(self, engine: LLMEngine, stepped: bool) -> None:
        """An AsyncLLMEngine step listener: called on the engine thread after each loop turn.
        Never raises: a fault here must not stop the engine loop (the last view stays)."""
        try:
            self._on_step(engine, stepped)
        except Exception:  # noqa: BLE001
            if not self._failed:
                logger.exception("the load probe failed; the bouncer keeps its last view of the engine")
            self._failed = True

    def _on_step(self, engine: LLMEngine, stepped: bool) -> None:
        now = time.perf_counter()
        stats = engine.get_stats()
        prefilled, self._prompt_tokens = stats.prompt_tokens - self._prompt_tokens, stats.prompt_tokens
        if stepped and self._last_end is not None and stats.batch_num_tokens:
            # The whole turn (inbox, schedule, forward, sampling, outputs): what a step really costs.
            self.turns.append((max(0, stats.batch_num_tokens - prefilled), prefilled, now - self._last_end))
            if len(self.turns) >= MIN_TURNS:
                self.costs = fit_costs(self.turns)
        # The turn after one that left nothing to do starts by blocking on the inbox: its length
        # is idle time, not a step's.
        self._last_end = now if engine.has_unfinished_requests() else None
        ended = [s for s in self._running if s.is_finished and s.finish_reason in ("stop", "length")]
        if ended:  # "stop": its natural length; "length": cut, so it might have gone on for ever
            self._lengths.extend(s.num_output_tokens if s.finish_reason == "stop" else math.inf for s in ended)
            self.lengths = Lengths.of(self._lengths)
        self._running = list(engine.scheduler.running)
        self.view = self._build(engine)

    def _load(self, seq: Sequence) -> SeqLoad:
        p = seq.params
        room = self.max_model_len - seq.num_tokens
        left = max(0, min(room, p.max_tokens - seq.num_output_tokens if p.max_tokens is not None else room))
        pending = seq.num_tokens - seq.num_computed_tokens
        if not seq.num_computed_tokens:  # not started: what the prefix cache holds is not computed again
            pending -= self._blocks.cached_prefix_tokens(seq.token_ids, seq.block_keys)
        # A decoding sequence has one token without KV, its newest: a decode, not a prompt token.
        prefill = pending - 1 if seq.num_output_tokens and pending else pending
        done = seq.num_output_tokens
        steps = self.lengths.steps_left(done, done + left)
        # Its claim: the blocks of its expected length, or those it holds, within the pool.
        claim = max(-(-(seq.num_tokens + steps) // self.block_size), len(seq.block_table))
        claim = min(claim, self._blocks.num_blocks)
        return SeqLoad(seq.request.request_id, steps, claim, prefill, seq.request.priority)

    def _build(self, engine: LLMEngine) -> LoadView:
        sched = engine.scheduler
        waiting = [self._load(s) for s in sched.waiting]
        waiting += [self._load(s) for r in engine.compiling for s in r.seqs]
        b = self._base
        return LoadView(tuple(self._load(s) for s in sched.running), tuple(waiting), frozenset(engine.requests),
                        *self.costs, b.max_num_seqs, b.num_blocks, b.by_priority, len(self.turns) >= MIN_TURNS,
                        self.lengths)
