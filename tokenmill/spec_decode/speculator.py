"""The engine's speculative decoding: who gets proposals each step, what was accepted, and (with
method "auto") whether proposing pays at all this step.

The decision is the roofline's. A plain decode step of B sequences reads the weights once and
computes B tokens; verifying k proposals each computes B(k+1) tokens for the same weight read.
While the step is bandwidth-bound the extra tokens are nearly free, and each sequence gains the
expected accepted length E = 1 + sum_j P(position j accepted); once B(k+1) tokens push the step
past the ridge, its time grows with the tokens and E no longer covers it. So each step compares
  plain: t(B tokens) / B      with      speculative: (t(B(k+1) tokens) + t_propose) / (B * E)
(time per emitted token), with t from the model's cost and the device's peaks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.layers.sampler import SampledToken
from tokenmill.model_cost import ModelCost
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.ngram import NgramProposer

if TYPE_CHECKING:
    from tokenmill.spec_decode.draft_model import DraftModelProposer

logger = logging.getLogger(__name__)

# Before anything is measured, "auto" assumes each position is accepted half the time.
_PRIOR_ACCEPTANCE = 0.5
_PRIOR_WEIGHT = 8  # proposals' worth of that prior, so a handful of real ones dominate it
# After this many steps decided against proposing, one step proposes anyway, to measure again.
_PROBE_EVERY = 64


@dataclass
class SpecDecodeStats:
    """Cumulative, as vLLM's spec_decode_* counters."""

    num_drafts: int = 0  # proposals verified (one per sequence per step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    steps_with_proposals: int = 0
    steps_without: int = 0  # "auto" decided against proposing
    decision: dict[str, Any] = field(default_factory=dict)  # the last "auto" decision and its inputs

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification: 1 + accepted proposals."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def step_seconds(cost: ModelCost, chunks: list[tuple[int, int]], peak_flops: float, peak_bandwidth: float) -> float:
    """The roofline time of one forward over `chunks` ((context, new tokens) per sequence)."""
    flops, nbytes = cost.step(chunks, sum(n for _, n in chunks))  # every computed row's logits
    return max(flops / peak_flops, nbytes / peak_bandwidth)


class Speculator:
    def __init__(self, config: SpeculativeConfig, cost: ModelCost, max_model_len: int,
                 draft: Optional["DraftModelProposer"] = None) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.cost = cost
        self.max_model_len = max_model_len
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max) if config.uses_ngram else None
        self.draft = draft
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        self.peaks: Optional[tuple[float, float]] = None  # (FLOP/s, bytes/s), set by the engine for "auto"
        self.overhead_s = 0.0  # measured host time per forward beyond the roofline (observe_step)
        self._declined = 0  # steps decided against proposing since the last proposal

    def budget(self, seq: Sequence) -> int:
        """Proposals worth making: every emitted token counts against max_tokens and the model
        length, and the verification always emits one more than it accepts."""
        room = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens)
        return max(0, min(self.k, room - 1))

    def eligible(self, seq: Sequence) -> bool:
        # Penalties depend on every token before a position, proposals included: such requests
        # decode plainly. So do sequences still prefilling.
        return (seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens - 1
                and not seq.params.needs_penalties)

    def propose(self, running: list[Sequence]) -> None:
        """Set spec_token_ids (and spec_probs) for the next step's decodes."""
        if self.draft is not None:  # the draft's KV of sequences that left the batch goes back
            self.draft.release({s.seq_id for s in running})
        seqs = [s for s in running if self.eligible(s) and self.budget(s) > 0]
        if not seqs:
            return
        if self.config.switches and not self.pays(running, seqs):
            self.stats.steps_without += 1
            return
        self.stats.steps_with_proposals += 1
        if self.draft is not None:
            self.draft.propose(seqs, [self.budget(s) for s in seqs])
            return
        assert self.ngram is not None
        for seq in seqs:
            seq.spec_token_ids = self.ngram.propose(seq.token_ids, self.budget(seq))

    def expected_length(self, budget: Optional[int] = None) -> float:
        """E[tokens emitted by a verification of `budget` (default k) proposals], from the
        measured per-position acceptance (each position's unconditional rate), blended with a
        prior."""
        s, w = self.stats, _PRIOR_WEIGHT
        return 1.0 + sum((s.accepted_per_position[j] + w * _PRIOR_ACCEPTANCE ** (j + 1)) / (s.num_drafts + w)
                         for j in range(self.k if budget is None else budget))

    def pays(self, running: list[Sequence], seqs: list[Sequence]) -> bool:
        """The roofline's verdict for this step (see the module docstring); recorded in stats.

        Two corrections to the pure roofline: each forward also costs the host time measured
        beyond its roofline time (launching kernels, building the batch; it is what a draft
        model's k small forwards mostly cost), and a "no" is tested again now and then by
        proposing anyway, or an acceptance rate measured once could never be revised."""
        if self.peaks is None:
            return True
        if self._declined >= _PROBE_EVERY:
            self._declined = 0
            self.stats.decision = dict(speculate=True, probe=True, batch=len(running), proposing=len(seqs))
            return True
        flops, bandwidth = self.peaks
        overhead = self.overhead_s
        decodes = [(s.num_computed_tokens, 1) for s in running]
        plain = step_seconds(self.cost, decodes, flops, bandwidth) + overhead
        budgets = {s.seq_id: self.budget(s) for s in seqs}
        spec_chunks = [(s.num_computed_tokens, 1 + budgets.get(s.seq_id, 0)) for s in running]
        spec = step_seconds(self.cost, spec_chunks, flops, bandwidth) + overhead
        if self.draft is not None:
            spec += self.draft.propose_seconds(seqs, self.k, flops, bandwidth) + self.k * overhead
        # Per sequence: what its own budget of proposals is expected to emit.
        emitted_spec = len(running) - len(seqs) + sum(self.expected_length(b) for b in budgets.values())
        emitted_plain = len(running)
        ok = spec / emitted_spec < plain / emitted_plain
        self._declined = 0 if ok else self._declined + 1
        self.stats.decision = dict(speculate=ok, probe=False, batch=len(running), proposing=len(seqs),
                                   expected_accepted_length=round(emitted_spec / len(running), 3),
                                   host_overhead_s=overhead, plain_step_s=plain, speculative_step_s=spec,
                                   plain_s_per_token=plain / emitted_plain,
                                   speculative_s_per_token=spec / emitted_spec)
        return ok

    def observe_step(self, seconds: float, chunks: list[tuple[int, int]]) -> None:
        """A plain (no proposals) step's measured time: what it took beyond its roofline time is
        the per-forward host overhead (an exponential moving average)."""
        if self.peaks is None or not chunks:
            return
        extra = max(0.0, seconds - step_seconds(self.cost, chunks, *self.peaks))
        self.overhead_s = extra if self.overhead_s == 0.0 else 0.9 * self.overhead_s + 0.1 * extra

    def record(self, drafted: dict[int, int], sampled: dict[int, list[SampledToken]]) -> None:
        """After a step: each verified proposal's accepted length."""
        s = self.stats
        for seq_id, k in drafted.items():
            tokens = sampled.get(seq_id)
            if not tokens or k == 0:
                continue
            accepted = len(tokens) - 1
            s.num_drafts += 1
            s.num_draft_tokens += k
            s.num_accepted_tokens += accepted
            for j in range(accepted):
                s.accepted_per_position[j] += 1


def make_speculator(config: SpeculativeConfig, model_config: Any, cache_config: Any, scheduler_config: Any,
                    runner: Any) -> Speculator:
    """The engine's Speculator: a draft model loaded when the config names one, and for "auto"
    the device's peaks (the same numbers MBU/MFU are measured against)."""
    draft = None
    if config.model is not None:
        from tokenmill.spec_decode.draft_model import DraftModelProposer

        draft = DraftModelProposer(config, model_config, cache_config, scheduler_config, runner)
    speculator = Speculator(config, runner.cost, scheduler_config.max_model_len, draft)
    if config.switches:
        from tokenmill.devices import peaks

        speculator.peaks = peaks(runner.device, runner.dtype)
        logger.info("speculative decoding (auto): proposing only while the roofline says it pays "
                    "(peak %.3g FLOP/s, %.3g B/s)", *speculator.peaks)
    return speculator
