"""From logits to next tokens, one row per sequence, each with its own sampling parameters.

Order (vLLM's): logit_bias, min_tokens masking, the grammar mask of constrained rows (one call
for the whole batch) and penalties on the logits; greedy rows take the argmax;
the others are divided by temperature, filtered by min_p, top_k and top_p, and sampled. The
returned logprobs are those of the raw model output, before any of the processing above.
Sampling uses the exponential-race trick (argmax of p / q with q ~ Exp(1)), which draws from p
and lets each seeded row use its own generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tokenmill.outputs import Logprob
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.matcher import apply_bitmask


@dataclass
class SampledToken:
    """One token a step produced for a sequence."""

    token_id: int
    logprob: float
    top_logprobs: Optional[dict[int, Logprob]] = None  # when the request asked for logprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # raw logprob of each sampled token
    ranks: Optional[list[int]]  # 1 = the most likely token; only when some row asked for logprobs
    top_ids: Optional[torch.Tensor] = None  # [S, k] when any row asked for logprobs
    top_logprobs: Optional[torch.Tensor] = None


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    params: list[SamplingParams]) -> torch.Tensor:
    """Repetition (HF-style, prompt + output), presence and frequency (output only) penalties."""
    S, V = logits.shape
    for i, p in enumerate(params):
        if not p.needs_penalties:
            continue
        out = torch.tensor(output_ids[i], dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype) if out.numel() else None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(prompt_ids[i] + output_ids[i], dtype=torch.long, device=logits.device)] = True
            row = logits[i]
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, row)
        if counts is not None:
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Mask filtered-out tokens to -inf. top_k 0 / top_p 1 / min_p 0 leave a row alone."""
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        keep = probs >= min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        V = logits.shape[-1]
        ranks = torch.arange(V, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, V)[:, None]
        drop = ranks >= k
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop |= (sorted_probs.cumsum(-1) - sorted_probs) > top_p[:, None]
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def exponential_noise(shape: tuple[int, int], generators: list[Optional[torch.Generator]],
                      global_generator: torch.Generator) -> torch.Tensor:
    """Exp(1) noise for the exponential race, one row per entry of `generators`. Generators live
    on the CPU so a seed means the same draws on every device. Seeded rows draw from their own
    generator; the others share one draw of the engine's."""
    noise = torch.empty(shape, dtype=torch.float32)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), shape[1]).exponential_(generator=global_generator)
    for j, g in enumerate(generators):
        if g is not None:
            noise[j].exponential_(generator=g)
    return noise


class Sampler:
    def prepare(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: Optional[list[list[int]]],
                output_ids: Optional[list[list[int]]], banned: list[list[int]],
                bitmask: Optional[tuple[torch.Tensor, list[int]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw logprobs, processed logits): logit_bias, the banned tokens, the grammar mask and
        the penalties applied, row by row; what greedy rows take the argmax of."""
        logits = logits.float()
        raw_logprobs = logits.log_softmax(-1)
        for i, p in enumerate(params):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        for i, ids in enumerate(banned):
            if ids:
                logits[i, ids] = float("-inf")
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        if any(p.needs_penalties for p in params):
            logits = apply_penalties(logits, prompt_ids, output_ids, params)
        return raw_logprobs, logits

    @staticmethod
    def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution a sampled row draws from: temperature, then min_p, top_k, top_p."""
        device = logits.device
        scaled = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        scaled = apply_top_k_top_p_min_p(scaled, torch.tensor([p.top_k for p in params], device=device),
                                         torch.tensor([p.top_p for p in params], device=device),
                                         torch.tensor([p.min_p for p in params], device=device))
        return scaled.softmax(-1)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: Optional[list[list[int]]],
                 output_ids: Optional[list[list[int]]], generators: list[Optional[torch.Generator]],
                 banned: list[list[int]], global_generator: torch.Generator,
                 bitmask: Optional[tuple[torch.Tensor, list[int]]] = None) -> SamplerOutput:
        """Args:
            logits: [S, V] for the S sequences that sample this step.
            banned: per row, token ids masked out (EOS / stop tokens before min_tokens).
            prompt_ids, output_ids: per row, the token history; needed (and built by the caller)
                only when some row has a penalty, so a plain step copies no history.
            generators: per row, the request's own generator, or None for the engine's.
            bitmask: the grammar's allowed tokens for the constrained rows (structured/matcher.py).
        """
        raw_logprobs, logits = self.prepare(logits, params, prompt_ids, output_ids, banned, bitmask)
        tokens = logits.argmax(-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
            probs = self.probs(logits[rows], [params[i] for i in random_rows])
            noise = exponential_noise(tuple(probs.shape), [generators[i] for i in random_rows], global_generator)
            tokens[rows] = (probs / noise.to(probs.device)).argmax(-1)
        chosen = raw_logprobs.gather(-1, tokens[:, None])
        wants = any(p.logprobs is not None for p in params)
        # Full-vocabulary ranks cost a pass over every logit: only when someone will read them.
        ranks = ((raw_logprobs > chosen).sum(-1) + 1).tolist() if wants else None
        out = SamplerOutput(tokens.tolist(), chosen[:, 0].tolist(), ranks)
        k = max((p.logprobs or 0 for p in params), default=0)
        if k > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(k, dim=-1)
        return out
