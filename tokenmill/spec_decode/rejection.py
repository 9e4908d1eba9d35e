"""Which proposed tokens the target model accepts, and the token that follows them.

A sequence with k proposed tokens d_1..d_k is run over k + 1 positions in one forward: row i's
logits are the target's distribution p_i after d_1..d_i. Greedy: d_{i+1} is kept while it is the
argmax of p_i; the first mismatch is replaced by that argmax, and when all k match the argmax of
p_k is a bonus token. So a greedy request gets exactly the tokens it would without speculation.

Sampled (Leviathan et al., 2023; Chen et al., 2023): d_{i+1}, drawn by the proposer from q_i, is
kept with probability min(1, p_i(d) / q_i(d)); on the first rejection the token is drawn from
the residual max(0, p_i - q_i) renormalised; with all kept, the bonus comes from p_k. Every
emitted token is then distributed exactly as the target model's own sample. An n-gram proposal
is deterministic (q_i is a point mass), so d is kept with probability p_i(d) and the residual is
p_i without d.

p_i is the distribution the request samples from (logit_bias, grammar mask, min_tokens bans,
temperature, top_k/top_p/min_p applied), so the guarantee covers those settings too. Uniform
draws come from the request's own generator when it is seeded, so a seeded request stays
reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tokenmill.layers.sampler import Sampler, exponential_noise
from tokenmill.sampling_params import SamplingParams


@dataclass
class Draft:
    """One sequence's proposal, as the verifier sees it."""

    tokens: list[int]  # d_1..d_k
    params: SamplingParams
    generator: Optional[torch.Generator]
    probs: Optional[torch.Tensor] = None  # [k, V] q_1..q_k; None: a deterministic proposal


def _uniform(generator: Optional[torch.Generator], global_generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator if generator is not None else global_generator))


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator], global_generator: torch.Generator) -> int:
    noise = exponential_noise((1, probs.shape[-1]), [generator], global_generator)
    return int((probs.float().cpu() / noise[0]).argmax())


def accept_drafts(logits: torch.Tensor, drafts: list[Draft], global_generator: torch.Generator) -> list[list[int]]:
    """The emitted tokens of each draft: its accepted prefix, then one more.

    Args:
        logits: [sum(k_j + 1), V] processed logits (Sampler.prepare), k_j + 1 rows per draft.
        drafts: in row order.
    Returns:
        per draft, 1..k_j + 1 token ids.
    """
    out: list[list[int]] = []
    firsts, row = [], 0
    for d in drafts:
        firsts.append(row)
        row += len(d.tokens) + 1
    greedy_pick = logits.argmax(-1).tolist()
    # The sampled drafts' distributions, all in one call (temperature, top_k/top_p/min_p).
    sampled = [(d, f) for d, f in zip(drafts, firsts) if not d.params.greedy]
    sampled_rows = [f + i for d, f in sampled for i in range(len(d.tokens) + 1)]
    probs = (Sampler.probs(logits[sampled_rows], [d.params for d, _ in sampled for _ in range(len(d.tokens) + 1)]).cpu()
             if sampled else None)
    at = 0  # where the next sampled draft's rows start in probs
    for d, first in zip(drafts, firsts):
        k = len(d.tokens)
        if d.params.greedy:
            picks = greedy_pick[first:first + k + 1]
            n = 0
            while n < k and picks[n] == d.tokens[n]:
                n += 1
            out.append(d.tokens[:n] + [picks[n]])
            continue
        p = probs[at:at + k + 1]
        at += k + 1
        emitted: list[int] = []
        for i, token in enumerate(d.tokens):
            q = d.probs[i].float().cpu() if d.probs is not None else None
            q_tok = float(q[token]) if q is not None else 1.0
            if q_tok > 0 and _uniform(d.generator, global_generator) * q_tok < float(p[i, token]):
                emitted.append(token)
                continue
            residual = (p[i] - q).clamp_min(0) if q is not None else p[i].clone()
            if q is None:
                residual[token] = 0.0
            if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
                residual = p[i]
            emitted.append(_draw(residual, d.generator, global_generator))
            break
        else:
            emitted.append(_draw(p[k], d.generator, global_generator))
        out.append(emitted)
    return out
