"""A step's model inputs: rank 0 builds the step from the scheduler's decision, every rank turns
it into tensors with its persistent batch.

What travels to the other ranks is small and plain (it pickles): the batch diff, and per
micro-batch the sequence ids, counts and the token ids computed now. With one process it goes
straight to the model runner.

With pipeline parallelism the step is cut into micro-batches (whole sequences each), so stage 1
can work on the first micro-batch while stage 0 computes the second.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.engine.kv_tiers import BlockCopy
from tokenmill.engine.persistent_batch import BatchDiff, BatchDiffer, PersistentBatch
from tokenmill.engine.sequence import Sequence
from tokenmill.layers.attention import AttentionContext

# Decodes are attended in groups of similar context length on the gather path; a group is padded
# to its longest context, so it is closed once that would waste more than this share of its KV.
_DECODE_GROUP_MAX_PADDING = 0.25


@dataclass
class MicroBatch:
    """One forward's work: the flat batch is decode tokens first (one per sequence, shortest
    context first), then prefill chunks."""

    seq_ids: list[int]
    num_computed: list[int]  # tokens with KV before this step
    query_lens: list[int]  # tokens computed now
    num_decodes: int
    decode_groups: list[tuple[int, int]]
    input_ids: torch.Tensor  # [T] long
    logits_rows: torch.Tensor  # [R] long: rows of the hidden states whose logits rank 0 needs
    # Rank 0 only (not sent): how the logits map back to sequences.
    ordered: list[tuple[Sequence, int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # index into logits_rows, per sampled seq
    sampled: list[Sequence] = field(default_factory=list)
    # Per sampled seq, the proposed tokens it verifies: its rows are sample_rows[j] .. + k.
    num_drafts: list[int] = field(default_factory=list)
    prompt_rows: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # seq_id -> (row, first, last)

    def for_workers(self) -> "MicroBatch":
        return MicroBatch(self.seq_ids, self.num_computed, self.query_lens, self.num_decodes, self.decode_groups,
                          self.input_ids, self.logits_rows)


@dataclass
class StepInput:
    block_copies: list[BlockCopy]
    diff: BatchDiff
    micro_batches: list[MicroBatch]

    def for_workers(self) -> "StepInput":
        return StepInput(self.block_copies, self.diff, [m.for_workers() for m in self.micro_batches])


@dataclass
class ModelInput:
    """One forward's tensors on this rank's device."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    attention: AttentionContext
    logits_rows: torch.Tensor


def split_micro_batches(scheduled: list[tuple[Sequence, int]], n: int) -> list[list[tuple[Sequence, int]]]:
    """Up to n groups of whole sequences with about equal token counts (greedy, largest first)."""
    n = max(1, min(n, len(scheduled)))
    if n == 1:
        return [scheduled]
    groups: list[list[tuple[Sequence, int]]] = [[] for _ in range(n)]
    load = [0] * n
    for item in sorted(scheduled, key=lambda x: -x[1]):
        i = load.index(min(load))
        groups[i].append(item)
        load[i] += item[1]
    return [g for g in groups if g]


def _decode_groups(context_lens: list[int]) -> list[tuple[int, int]]:
    """Split ascending context lengths into ranges whose padding stays under the threshold."""
    groups, start = [], 0
    while start < len(context_lens):
        end, total = start + 1, context_lens[start]
        while end < len(context_lens):
            longest = context_lens[end]
            if longest * (end - start + 1) > (total + longest) * (1 + _DECODE_GROUP_MAX_PADDING):
                break
            end, total = end + 1, total + longest
        groups.append((start, end))
        start = end
    return groups


def build_micro_batch(scheduled: list[tuple[Sequence, int]]) -> MicroBatch:
    # Decodes sorted by context length, so neighbours can share one padded attention call.
    decodes = sorted(((s, n) for s, n in scheduled if n == 1), key=lambda x: x[0].num_computed_tokens)
    ordered = decodes + [(s, n) for s, n in scheduled if n > 1]
    input_ids: list[int] = []
    for seq, n in ordered:
        c = seq.num_computed_tokens
        ids = seq.token_ids[c:c + n]
        input_ids.extend(ids)
        if len(ids) < n:  # a decode verifying proposed tokens: they are computed after it
            input_ids.extend(seq.spec_token_ids[:n - len(ids)])
    mb = MicroBatch([s.seq_id for s, _ in ordered], [s.num_computed_tokens for s, _ in ordered],
                    [n for _, n in ordered], len(decodes),
                    _decode_groups([s.num_computed_tokens + 1 for s, _ in decodes]),
                    torch.tensor(input_ids, dtype=torch.long), torch.empty(0), ordered=ordered)
    rows: list[int] = []
    offset = 0
    for seq, n in ordered:
        c = seq.num_computed_tokens
        req = seq.request
        if seq.index == 0 and req.wants_prompt_logprobs:
            # Hidden state at position p predicts prompt token p + 1.
            first = len(req.prompt_logprobs) - 1  # first position not yet scored
            last = min(c + n, seq.num_prompt_tokens - 1)  # positions [first, last)
            if first >= c and last > first:
                mb.prompt_rows[seq.seq_id] = (len(rows), first, last)
                rows.extend(range(offset + first - c, offset + last - c))
        if c + n >= seq.num_tokens:  # the chunk reaches the end: sample the next token
            k = c + n - seq.num_tokens  # proposed tokens: each position's logits check the next
            mb.sample_rows.append(len(rows))
            mb.sampled.append(seq)
            mb.num_drafts.append(k)
            rows.extend(range(offset + n - 1 - k, offset + n))
        offset += n
    mb.logits_rows = torch.tensor(rows, dtype=torch.long)
    return mb


def build_step(differ: BatchDiffer, scheduled: list[tuple[Sequence, int]], block_copies: list[BlockCopy],
               num_micro_batches: int) -> StepInput:
    groups = split_micro_batches(scheduled, num_micro_batches)
    return StepInput(list(block_copies), differ.diff([s for s, _ in scheduled]),
                     [build_micro_batch(g) for g in groups])


def model_input(batch: PersistentBatch, mb: MicroBatch, device: torch.device) -> ModelInput:
    """The micro-batch's tensors from this rank's persistent batch, on this rank's device."""
    positions, slots, tables, context_lens = batch.step_tensors(mb.seq_ids, mb.num_computed, mb.query_lens)
    ctx = AttentionContext(slots.to(device), tables.to(device), context_lens.to(device), mb.query_lens,
                           mb.num_decodes, mb.decode_groups)
    return ModelInput(mb.input_ids.to(device), positions.to(device), ctx, mb.logits_rows.to(device))


def sampled_seqs(step: StepInput) -> list[Sequence]:
    return [s for m in step.micro_batches for s in m.sampled]
