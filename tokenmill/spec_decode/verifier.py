"""The target model's verdict on a step's proposed tokens, as SampledTokens for the scheduler.

Each verifying sequence has k + 1 rows of logits (after its last token and after each proposed
one). Every row gets what that position would get in a plain decode: the request's logit_bias,
the min_tokens ban while the output at that position is still short, and the grammar's mask for
the state after the proposed tokens before it. A proposal the grammar refuses is cut there, so
only tokens the grammar allows are ever accepted.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import xgrammar as xgr

from tokenmill.engine.sequence import Sequence
from tokenmill.layers.sampler import SampledToken, Sampler
from tokenmill.outputs import Logprob
from tokenmill.spec_decode.rejection import Draft, accept_drafts
from tokenmill.structured.matcher import GrammarState


def grammar_prefix(state: GrammarState, tokens: list[int]) -> int:
    """How many of `tokens` the grammar accepts in a row (the matcher is left where it was)."""
    n = 0
    while n < len(tokens) and state.matcher.accept_token(tokens[n]):
        n += 1
    if n:
        state.matcher.rollback(n)
    return n


def fill_draft_masks(state: GrammarState, tokens: list[int], mask: torch.Tensor, first_row: int) -> None:
    """Rows first_row .. first_row + len(tokens): the grammar's mask before each token and after
    the last (every token must be one the grammar accepts: see grammar_prefix)."""
    accepted = 0
    for i, token in enumerate(tokens):
        state.matcher.fill_next_token_bitmask(mask, first_row + i)
        state.matcher.accept_token(token)
        accepted += 1
        if state.matcher.is_terminated():  # a stop token: the output ends there, later rows go unused
            break
    if not state.matcher.is_terminated():
        state.matcher.fill_next_token_bitmask(mask, first_row + len(tokens))
    if accepted:
        state.matcher.rollback(accepted)


class Verifier:
    def __init__(self, sampler: Sampler, vocab_size: int, token_text: Callable[[int], Optional[str]]) -> None:
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.token_text = token_text

    def verify(self, logits: torch.Tensor, items: list[tuple[Sequence, int, int]], banned: dict[int, list[int]],
               grammars: dict[int, GrammarState], generator: torch.Generator) -> dict[int, list[SampledToken]]:
        """Args:
            logits: the step's sampled rows; items: (sequence, its first row, its k proposals).
        Returns:
            per sequence, the accepted proposals and the token after them.
        """
        rows: list[int] = []
        params, bans, drafts = [], [], []
        for seq, first, k in items:
            tokens = seq.spec_token_ids[:k]
            grammar = grammars.get(seq.seq_id)
            if grammar is not None:
                tokens = tokens[:grammar_prefix(grammar, tokens)]
            n = len(tokens)
            rows.extend(range(first, first + n + 1))
            params += [seq.params] * (n + 1)
            short = banned.get(seq.seq_id, [])
            bans += [short if seq.num_output_tokens + i < seq.params.min_tokens else [] for i in range(n + 1)]
            probs = seq.spec_probs[:n] if seq.spec_probs is not None else None
            # The grammar cut a drafted token it refuses: seen and rejected, not merely unproposed.
            cut = seq.spec_probs[n] if seq.spec_probs is not None and n < k else None
            drafts.append(Draft(tokens, seq.params, seq.generator, probs, cut))
        bitmask = None
        if any(seq.seq_id in grammars for seq, _, _ in items):
            mask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
            constrained, row = [], 0
            for (seq, _, _), d in zip(items, drafts):
                grammar = grammars.get(seq.seq_id)
                if grammar is not None:
                    fill_draft_masks(grammar, d.tokens, mask, row)
                    constrained.extend(range(row, row + len(d.tokens) + 1))
                row += len(d.tokens) + 1
            bitmask = (mask, constrained)
        # NOTE: requests with penalties are never given proposals (the penalty of each position
        # would depend on the proposals before it), so no token history is needed here.
        raw, processed = self.sampler.prepare(logits[rows], params, None, None, bans, bitmask)
        emitted = accept_drafts(processed, drafts, generator)
        result: dict[int, list[SampledToken]] = {}
        row = 0
        for (seq, _, _), d, tokens in zip(items, drafts, emitted):
            result[seq.seq_id] = [self._token(raw[row + i], t, seq.params.logprobs) for i, t in enumerate(tokens)]
            row += len(d.tokens) + 1
        return result

    def _token(self, raw: torch.Tensor, token: int, num_logprobs: Optional[int]) -> SampledToken:
        logprob = float(raw[token])
        if num_logprobs is None:
            return SampledToken(token, logprob)
        top = {token: Logprob(logprob, int((raw > raw[token]).sum()) + 1, self.token_text(token))}
        if num_logprobs:
            values, ids = raw.topk(num_logprobs)
            for r, (v, t) in enumerate(zip(values.tolist(), ids.tolist())):
                if t not in top:
                    top[t] = Logprob(v, r + 1, self.token_text(t))
        return SampledToken(token, logprob, top)
