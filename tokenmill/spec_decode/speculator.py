"""The engine's speculative decoding: who gets proposals each step, what was accepted, and (with
method "auto") whether proposing pays at all this step.

A plain decode step of B sequences reads the weights once and computes B tokens; verifying
proposals computes their rows too, for the same weight read. While the step is bandwidth-bound
the extra rows are nearly free, and each proposing sequence gains its expected accepted length
E = 1 + sum_j P(position j accepted); once the rows push the step past the ridge its time grows
with them and E no longer covers it. So each step compares time per emitted token,
  plain: t(0 rows) / B      with      speculative: (t(R rows) + t_propose) / (B + sum(E_i - 1)),
with t from the model's cost at the device's peaks (the roofline), corrected by the steps
measured at this batch size (step_times.py), and E from the measured acceptance. The n-gram
proposals are looked up before deciding (it costs little), so R and each E_i are those of the
proposals actually at hand.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.layers.sampler import SampledToken
from tokenmill.model_cost import ModelCost
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.step_times import StepTimes

if TYPE_CHECKING:
    from tokenmill.spec_decode.draft_model import DraftModelProposer

logger = logging.getLogger(__name__)

# Before anything is measured, "auto" assumes each position is accepted half the time.
_PRIOR_ACCEPTANCE = 0.5
_PRIOR_WEIGHT = 8  # proposals' worth of that prior, so a handful of real ones dominate it
# The acceptance "auto" plans with forgets each verified proposal at this rate per later one
# (a memory of ~500 proposals), so it follows a workload that changes (a repetitive batch of
# requests, then free chat) instead of averaging over the server's whole life.
_ACCEPTANCE_DECAY = 1 - 1 / 512
# Steps decided against proposing propose anyway now and then, to measure again; such probes
# cost at most this share of the declined steps' time.
PROBE_SHARE = 0.02
# A "no" that held even for every budget proposed stands for this many more steps at that batch size.
REUSE_STEPS = 7
# A draft's catch-up on a new sequence's context counts against at most this many steps.
AMORTIZE_STEPS = 16


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


@dataclass
class _Plan:
    """One step's estimates for the "auto" decision."""

    batch: int
    roofline_plain: float  # the roofline's time of the plain step
    plain: float  # the plain step's time, corrected by measurement
    per_row: float  # what each proposed token's row adds to it
    measured: float  # ~how many recent steps at this batch size the correction rests on
    table: list[float]  # expected tokens a verification of n proposals emits, n = 0..k
    drafting: Optional[tuple[float, float]]  # the draft's (fixed seconds, seconds per catch-up token)
    best_s: float = 0.0  # the step's time if every sequence proposed its whole budget
    best_emitted: float = 0.0
    best_pays: bool = True

    def emitted(self, lengths: list[int]) -> float:
        return self.batch + sum(self.table[n] - 1.0 for n in lengths)

    def draft_seconds(self, catch_up: float) -> float:
        return 0.0 if self.drafting is None else self.drafting[0] + self.drafting[1] * catch_up

    def set_best(self, budgets: list[int]) -> None:
        """The best case (catch-up aside): proposals of every budget, each worth its expected tokens."""
        self.best_s = self.plain + self.per_row * sum(budgets) + self.draft_seconds(0.0)
        self.best_emitted = self.emitted(budgets)
        self.best_pays = self.best_s / self.best_emitted < self.plain / self.batch

    def best_inputs(self) -> dict[str, Any]:
        return dict(batch=self.batch, expected_accepted_length=round(self.table[-1], 3),
                    expected_tokens=round(self.best_emitted, 3), speculative_step_s=self.best_s,
                    speculative_s_per_token=self.best_s / self.best_emitted)

    def describe(self, speculate: bool, probe: bool, inputs: dict[str, Any]) -> dict[str, Any]:
        return dict(speculate=speculate, probe=probe, **inputs, plain_step_s=self.plain,
                    plain_s_per_token=self.plain / self.batch, roofline_plain_step_s=self.roofline_plain,
                    per_proposed_token_s=self.per_row, measured_steps=round(self.measured, 1))


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
        # Decayed counts behind expected_lengths: [proposals verified, accepted at position 1, ...].
        self.recent = [0.0] * (self.k + 1)
        self.peaks: Optional[tuple[float, float]] = None  # (FLOP/s, bytes/s), set by the engine for "auto"
        self.overhead_s = 0.0  # measured host time per forward beyond the roofline (observe_step)
        self.times = StepTimes()  # measured step times that correct the roofline's
        self._declined_s = 0.0  # estimated time of the steps declined since the last proposal
        # A clear "no": (batch, plain step seconds, steps it still stands, num_drafts when made).
        self._reuse: Optional[tuple[int, float, int, int]] = None

    def budget(self, seq: Sequence) -> int:
        """Proposals worth making: every emitted token counts against max_tokens and the model
        length, and the verification always emits one more than it accepts."""
        return max(0, min(self.k, self.budget_left(seq) - 1))

    def eligible(self, seq: Sequence) -> bool:
        # Penalties depend on every token before a position, proposals included: such requests
        # decode plainly. So do sequences still prefilling.
        return (seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens - 1
                and not seq.params.needs_penalties)

    def propose(self, running: list[Sequence]) -> None:
        """Set spec_token_ids (and spec_probs) for the next step's decodes."""
        for seq in running:  # a sequence the last step left out keeps no proposal it was not given now
            seq.spec_token_ids, seq.spec_probs = [], None
        if self.draft is not None:  # the draft's KV of sequences that left the batch goes back
            self.draft.release({s.seq_id for s in running})
        if self.ngram is not None and self.ngram.num_kept > len(running):
            self.ngram.retain(s.seq_id for s in running)
        pairs = [(s, b) for s in running if self.eligible(s) and (b := self.budget(s)) > 0]
        if not pairs:
            return
        seqs, budgets = [s for s, _ in pairs], [b for _, b in pairs]
        plan = None
        if self.config.switches and self.peaks is not None:
            batch, plain, left, drafts = self._reuse or (0, 0.0, 0, 0)
            if batch == len(running) and left > 0 and drafts == self.stats.num_drafts:
                # A clear "no" at this batch size holds for a few steps without working it out
                # again (unless acceptance was measured since): at batch 1 a step can take under
                # 2 ms, and the estimate ~30 us of it.
                self._reuse = (batch, plain, left - 1, drafts)
                self._declined_s += plain
                self.stats.steps_without += 1
                return
            plan = self._plan(running, seqs, budgets)
            if not plan.best_pays and PROBE_SHARE * self._declined_s < plan.best_s - plan.plain:
                # Not even every sequence proposing its whole budget would pay, and no probe is
                # due: decline before looking anything up.
                self._decline(plan, plan.best_inputs())
                self._reuse = (plan.batch, plan.plain, REUSE_STEPS, self.stats.num_drafts)
                return
        self._reuse = None
        proposals = None
        if self.ngram is not None:  # a lookup costs little: "auto" decides on the actual proposals
            proposals = [self.ngram.propose(s.token_ids, b, key=s.seq_id) for s, b in zip(seqs, budgets)]
            if not any(proposals):
                return
        if plan is not None and not self.pays(plan, seqs, [len(p) for p in proposals] if proposals else budgets):
            if proposals is None:  # a draft's "no" was on the best case too: as clear, reused alike
                self._reuse = (plan.batch, plan.plain, REUSE_STEPS, self.stats.num_drafts)
            return
        self.stats.steps_with_proposals += 1
        if self.draft is not None:
            started, catch_up = time.perf_counter(), sum(self.draft.catch_up_tokens(seqs))
            self.draft.propose(seqs, budgets)
            self.times.observe_draft(len(seqs), catch_up, time.perf_counter() - started)
            return
        assert proposals is not None
        for seq, proposal in zip(seqs, proposals):
            seq.spec_token_ids = proposal

    def expected_lengths(self) -> list[float]:
        """E[tokens emitted by a verification of n proposals], n = 0..k, from the recently
        measured per-position acceptance (each position's unconditional rate), blended with a prior."""
        r, w = self.recent, _PRIOR_WEIGHT
        out = [1.0]
        for j in range(self.k):
            out.append(out[-1] + (r[j + 1] + w * _PRIOR_ACCEPTANCE ** (j + 1)) / (r[0] + w))
        return out

    def _plan(self, running: list[Sequence], seqs: list[Sequence], budgets: list[int]) -> "_Plan":
        """This batch's plain step time, what each proposed row adds (roofline, corrected by
        measurement), the draft's fixed cost, and the best case: every budget proposed."""
        assert self.peaks is not None
        flops, bandwidth = self.peaks
        batch, full = len(running), len(running) * self.k
        plain_rl = step_seconds(self.cost, [(s.num_computed_tokens, 1) for s in running], flops, bandwidth)
        full_rl = step_seconds(self.cost, [(s.num_computed_tokens, 1 + self.k) for s in running], flops, bandwidth)
        plain, per_row = self.times.step_line(batch, plain_rl + self.overhead_s, (full_rl - plain_rl) / full)
        table = self.expected_lengths()
        drafting = self._draft_line(seqs) if self.draft is not None else None
        plan = _Plan(batch, plain_rl, plain, per_row, self.times.measured_steps(batch), table, drafting)
        plan.set_best(budgets)
        return plan

    def pays(self, plan: "_Plan", seqs: list[Sequence], lengths: list[int]) -> bool:
        """The verdict for this step on proposals of these lengths (see the module docstring);
        recorded in stats.

        Step times are the roofline's, corrected by the steps measured at this batch size
        (step_times.py), the draft's proposing time likewise. A "no" is tested again now and then
        by proposing anyway, or an acceptance rate or a step time measured once could never be
        revised; what such probes cost is held to PROBE_SHARE of the declined steps' time."""
        rows = sum(lengths)
        spec = probe_cost = plan.plain + plan.per_row * rows
        if self.draft is not None:
            amortized, actual = self._catch_up(seqs, plan.table[self.k])
            spec += plan.draft_seconds(amortized)
            probe_cost += plan.draft_seconds(actual)
        emitted = plan.emitted(lengths)
        inputs = dict(batch=plan.batch, proposing=sum(1 for n in lengths if n), proposed_tokens=rows,
                      expected_accepted_length=round(plan.table[self.k], 3), expected_tokens=round(emitted, 3),
                      speculative_step_s=spec, speculative_s_per_token=spec / emitted)
        if spec / emitted < plan.plain / plan.batch:
            self._declined_s = 0.0
            self.stats.decision = plan.describe(True, False, inputs)
            return True
        return self._decline(plan, inputs, probe_cost)

    def _decline(self, plan: "_Plan", inputs: dict[str, Any], probe_cost: Optional[float] = None) -> bool:
        """A "no", unless the declined steps' time has paid for a probe (then "yes, to measure")."""
        self._declined_s += plan.plain
        if probe_cost is not None and PROBE_SHARE * self._declined_s >= probe_cost - plan.plain:
            self._declined_s = 0.0
            self.stats.decision = plan.describe(True, True, inputs)
            return True
        self.stats.steps_without += 1
        self.stats.decision = plan.describe(False, False, inputs)
        return False

    def _draft_line(self, seqs: list[Sequence]) -> tuple[float, float]:
        """The draft's proposing time for seqs as (fixed, per catch-up token): its k forwards,
        and each token its mirrors compute first (roofline priors, corrected by measurement)."""
        assert self.draft is not None and self.peaks is not None
        flops, bandwidth = self.peaks
        decode = self.draft.roofline_seconds([(s.num_tokens, 1) for s in seqs], flops, bandwidth)
        return self.times.draft_line(len(seqs), self.k * (decode + self.overhead_s),
                                     self.draft.roofline_seconds([(0, 1)], flops, bandwidth), len(seqs) * (self.k + 1))

    def _catch_up(self, seqs: list[Sequence], expected: float) -> tuple[float, float]:
        """Tokens the draft's mirrors compute before proposing, (as the decision counts them,
        actual). A new mirror's catch-up (the whole context) is paid once and serves the steps
        after it, so the decision spreads it over those (at most AMORTIZE_STEPS)."""
        assert self.draft is not None
        catch = self.draft.catch_up_tokens(seqs)
        spread = sum(c if self.draft.has_mirror(s) else c / max(1.0, min(AMORTIZE_STEPS, self.budget_left(s) / expected))
                     for s, c in zip(seqs, catch))
        return spread, float(sum(catch))

    def budget_left(self, seq: Sequence) -> int:
        """Tokens the sequence may still emit."""
        room = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens)
        return max(0, room)

    def observe_step(self, seconds: float, chunks: list[tuple[int, int]], rows: int) -> None:
        """A pure decode step's measured time (`rows` proposed tokens verified in it). A plain
        step's time beyond its roofline time also updates the host overhead per forward (an
        exponential moving average), the prior for batch sizes not measured yet."""
        if self.peaks is None or not chunks:
            return
        self.times.observe_step(len(chunks), rows, seconds)
        if rows == 0:
            extra = max(0.0, seconds - step_seconds(self.cost, chunks, *self.peaks))
            self.overhead_s = extra if self.overhead_s == 0.0 else 0.9 * self.overhead_s + 0.1 * extra

    def record(self, drafted: dict[int, int], sampled: dict[int, list[SampledToken]]) -> None:
        """After a step: each verified proposal's accepted length. As in vLLM, a proposal the
        model accepted counts even when a stop string or token then ends the output before it:
        the counters measure the proposer, not the output."""
        s, r = self.stats, self.recent
        accepted_at = [0] * self.k
        verified = 0
        for seq_id, k in drafted.items():
            tokens = sampled.get(seq_id)
            if not tokens or k == 0:
                continue
            accepted = len(tokens) - 1
            verified += 1
            s.num_draft_tokens += k
            s.num_accepted_tokens += accepted
            for j in range(accepted):
                accepted_at[j] += 1
        if not verified:
            return
        s.num_drafts += verified
        decay = _ACCEPTANCE_DECAY ** verified
        r[0] = r[0] * decay + verified
        for j, n in enumerate(accepted_at):
            s.accepted_per_position[j] += n
            r[j + 1] = r[j + 1] * decay + n


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
