"""A constrained sequence's place in its grammar, and the token mask of a whole batch.

The matcher follows the sequence's *accepted* output tokens, one `accept` per appended token.
Preemption in this engine recomputes a sequence's KV but keeps its tokens, so the matcher stays
in step across it with nothing to undo; `rollback` is there for a token that is taken back
(a rejected speculative token), so the matcher never runs ahead of the sequence.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import xgrammar as xgr

logger = logging.getLogger(__name__)


class GrammarState:
    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int]) -> None:
        # With no EOS to end on, the grammar's own end finishes the output.
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None,
                                          terminate_without_stop_token=not stop_token_ids)
        self.num_accepted = 0

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (a bug upstream:
        the sampler masks every disallowed token)."""
        ok = self.matcher.accept_token(token_id)
        if ok:
            self.num_accepted += 1
        else:
            logger.error("grammar refused token %d after %d accepted tokens", token_id, self.num_accepted)
        return ok

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted (or it needs none)."""
        return self.matcher.is_terminated()


def matches_nothing(compiled: xgr.CompiledGrammar) -> bool:
    """Whether a grammar allows no output at all (say the regex `[^\\s\\S]`): its first mask
    would leave no token to sample."""
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    if matcher.is_completed():  # the empty output is in the language
        return False
    mask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(mask, 0)
    return not bool(mask.any())


def batch_bitmask(states: Sequence[Optional[GrammarState]], vocab_size: int
                  ) -> Optional[tuple[torch.Tensor, list[int]]]:
    """One bitmask for every sampled row ([rows, ceil(V/32)] int32, a set bit = allowed) and the
    rows it constrains; None when no row has a grammar. Unconstrained rows stay all ones."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    mask = xgr.allocate_token_bitmask(len(states), vocab_size)
    for i in rows:
        states[i].matcher.fill_next_token_bitmask(mask, i)
    return mask, rows


def apply_bitmask(logits: torch.Tensor, bitmask: tuple[torch.Tensor, list[int]]) -> None:
    """Disallowed tokens of the constrained rows to -inf, in place, in one call for the batch."""
    mask, rows = bitmask
    xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device, non_blocking=True), indices=rows)
