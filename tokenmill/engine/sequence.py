"""A request and its sequences: the engine's unit of scheduling is the Sequence.

A request with n > 1 fans out into n sequences that share the prompt; each keeps its own tokens,
KV blocks, random generator and detokenizer state.
"""
from __future__ import annotations

import enum
import itertools
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Optional

import torch

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.outputs import Logprob, LogprobsList, RequestMetrics
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.structured.matcher import GrammarState

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + output), how many of them have KV in the cache, and the block table.

    NOTE: the scheduler's one rule works on `num_computed_tokens`: every step gives a sequence
    up to `num_tokens - num_computed_tokens` tokens to compute. A fresh prompt, a prompt chunk, a
    decode step and a sequence recomputed after preemption are all the same case.
    """

    def __init__(self, request: "Request", index: int, generator: Optional[torch.Generator]) -> None:
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Prefix caching: chain keys of the full blocks (valid for life: a prefix never changes)
        # and the content ids of the blocks registered or reused so far (reset on preemption).
        self.block_keys: list[int] = []
        self.block_cids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.generator = generator
        self.logprobs: Optional[LogprobsList] = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[int | str] = None
        self.detokenizer: Optional[IncrementalDetokenizer] = None
        self.grammar: Optional[GrammarState] = None  # set when structured_outputs constrain it
        # Speculative decoding: tokens proposed to follow token_ids, checked by the next step
        # (never part of token_ids until accepted), and the proposer's distributions for them.
        self.spec_token_ids: list[int] = []
        self.spec_probs: Optional[torch.Tensor] = None
        self.num_preemptions = 0
        # What earlier DELTA outputs carried: output tokens and characters of text.
        self.sent_tokens = 0
        self.sent_chars = 0

    @property
    def priority_key(self) -> tuple[int, float, int]:
        """The priority scheduler's order: priority, then arrival, then creation."""
        return self.request.priority, self.request.metrics.arrival_time, self.seq_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, top: Optional[dict[int, Logprob]]) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None and top is not None:
            self.logprobs.append(top)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


class Request:
    """One user request: the prompt, its parameters and the n sequences that answer it."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, priority: int = 0) -> None:
        self.request_id = request_id
        self.priority = priority  # with scheduling_policy "priority": lower runs first
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.grammar_future: Optional[Future] = None  # the compiled grammar, while it compiles
        # prompt_logprobs[i] describes prompt token i; the first has no context, hence None.
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            [None] if params.prompt_logprobs is not None else None)
        self.seqs: list[Sequence] = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                # NOTE: a private generator per sequence is what makes a seeded request give the
                # same tokens whatever else shares the batch.
                gen = torch.Generator().manual_seed(params.seed + i)
            self.seqs.append(Sequence(self, i, gen))

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))
