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
temperature, top_k/top_p/min_p applied), so the guarantee covers those settings too.

A seeded request must give the same output whatever else is in the batch, and whether or not a
step happened to speculate for it (that depends on the batch, the budget and "auto"). So its
draws are tied to output positions, not to proposals: position t always takes the t-th row of
exponential noise E_t from the request's generator, as a plain decode does, and the target's token
there is argmax(p_t / E_t), the plain decode's very token. The proposer draws its d_t =
argmax(q_t / E_t) from the same rows (a copy of the generator), and d_t is accepted when it equals
the target's token. For an n-gram proposal (q a point mass) that is rejection sampling itself:
d is kept with probability p(d), and otherwise the token is p's own draw given it is not d. For a
draft model's q it is the Gumbel coupling: still exactly the target's distribution (the output is
the target's own sample), with acceptance P(argmax p/E = argmax q/E) >= (1 - TV) / (1 + TV)
against rejection sampling's 1 - TV, the price of reproducibility. Unseeded requests use
rejection sampling with the engine's generator.
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
    # q_{k+1} when the proposer's next token d_{k+1} was cut because the grammar refuses it: that
    # draft was seen and rejected (p(d) = 0), so the token after d_k comes from the residual.
    cut_probs: Optional[torch.Tensor] = None


def _uniform(global_generator: torch.Generator) -> float:
    return float(torch.rand((), generator=global_generator))


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
        if d.generator is not None:
            out.append(_coupled(p, d.tokens, d.generator, global_generator))
        else:
            out.append(_rejection(p, d, global_generator))
    return out


def _coupled(p: torch.Tensor, tokens: list[int], generator: torch.Generator,
             global_generator: torch.Generator) -> list[int]:
    """A seeded request: each position's token is the target's own draw from that position's
    noise row (one row per emitted token, as in a plain decode); proposals are kept while they
    equal it."""
    emitted: list[int] = []
    for i in range(len(tokens) + 1):
        emitted.append(_draw(p[i], generator, global_generator))
        if i == len(tokens) or emitted[-1] != tokens[i]:
            break
    return emitted


def _rejection(p: torch.Tensor, d: Draft, global_generator: torch.Generator) -> list[int]:
    emitted: list[int] = []
    for i, token in enumerate(d.tokens):
        q = d.probs[i].float().cpu() if d.probs is not None else None
        q_tok = float(q[token]) if q is not None else 1.0
        if q_tok > 0 and _uniform(global_generator) * q_tok < float(p[i, token]):
            emitted.append(token)
            continue
        emitted.append(_draw(_residual(p[i], q, token), None, global_generator))
        return emitted
    if d.cut_probs is not None:
        emitted.append(_draw(_residual(p[-1], d.cut_probs.float().cpu(), None), None, global_generator))
    else:
        emitted.append(_draw(p[-1], None, global_generator))
    return emitted


def _residual(p: torch.Tensor, q: Optional[torch.Tensor], token: Optional[int]) -> torch.Tensor:
    """max(0, p - q), or p without the token for a point-mass q (unnormalised: _draw's race
    does not need it)."""
    residual = (p - q).clamp_min(0) if q is not None else p.clone()
    if q is None and token is not None:
        residual[token] = 0.0
    if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
        return p
    return residual
