"""A step's model inputs, built on rank 0 from the scheduler's decision and sent to every rank.

Everything here is plain CPU tensors and ints, so it pickles: with one process it goes straight to
the model runner, with several it is broadcast and each rank moves it to its own device.

With pipeline parallelism the step is cut into micro-batches (whole sequences each), so stage 1
can work on the first micro-batch while stage 0 computes the second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from tokenmill.engine.sequence import Sequence
from tokenmill.layers.attention import AttentionContext, DecodeGroup, PrefillChunk

# Decodes are attended in groups of similar context length; a group is padded to its longest
# context, so it is closed once that would waste more than this share of its gathered KV.
_DECODE_GROUP_MAX_PADDING = 0.25


@dataclass
class ModelInput:
    """One forward: the flat batch (decode tokens first, then prefill chunks) and its attention."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    attention: AttentionContext
    logits_rows: torch.Tensor  # [R] long: rows of the hidden states whose logits rank 0 needs
    ordered: list[tuple[Sequence, int]] = field(default_factory=list)  # rank 0 only, not sent
    sample_rows: list[int] = field(default_factory=list)  # index into logits_rows, per sampled seq
    sampled: list[Sequence] = field(default_factory=list)
    prompt_rows: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # seq_id -> (row, first, last)

    def for_workers(self) -> "ModelInput":
        return ModelInput(self.input_ids, self.positions, self.attention, self.logits_rows)


@dataclass
class StepInput:
    block_copies: list[tuple[str, int, int]]
    micro_batches: list[ModelInput]

    def for_workers(self) -> "StepInput":
        return StepInput(self.block_copies, [m.for_workers() for m in self.micro_batches])


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


def _slots(seq: Sequence, start: int, n: int, bs: int) -> torch.Tensor:
    pos = torch.arange(start, start + n)
    table = torch.tensor(seq.block_table, dtype=torch.long)
    return table[pos // bs] * bs + pos % bs


def _decode_groups(decodes: list[tuple[Sequence, int]]) -> list[DecodeGroup]:
    """Split the length-sorted decodes into groups whose padding stays under the threshold."""
    groups, start = [], 0
    while start < len(decodes):
        end, total = start + 1, decodes[start][0].num_computed_tokens + 1
        while end < len(decodes):
            longest = decodes[end][0].num_computed_tokens + 1
            new_total = total + longest
            if longest * (end - start + 1) > new_total * (1 + _DECODE_GROUP_MAX_PADDING):
                break
            end, total = end + 1, new_total
        seqs = [s for s, _ in decodes[start:end]]
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        groups.append(DecodeGroup(start, torch.tensor(tables, dtype=torch.long),
                                  torch.tensor([s.num_computed_tokens + 1 for s in seqs])))
        start = end
    return groups


def build_model_input(scheduled: list[tuple[Sequence, int]], block_size: int) -> ModelInput:
    bs = block_size
    # Decodes sorted by context length, so neighbours can share one padded attention call.
    decodes = sorted(((s, n) for s, n in scheduled if n == 1), key=lambda x: x[0].num_computed_tokens)
    prefills = [(s, n) for s, n in scheduled if n > 1]
    input_ids: list[int] = [s.token_ids[s.num_computed_tokens] for s, _ in decodes]
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    if decodes:
        pos = torch.tensor([s.num_computed_tokens for s, _ in decodes], dtype=torch.long)
        positions.append(pos)
        slots.append(torch.tensor([s.block_table[p // bs] * bs + p % bs
                                   for (s, _), p in zip(decodes, pos.tolist())], dtype=torch.long))
    ctx = AttentionContext(slot_mapping=torch.empty(0), decodes=_decode_groups(decodes))
    start = len(decodes)
    for seq, n in prefills:
        c = seq.num_computed_tokens
        input_ids.extend(seq.token_ids[c:c + n])
        positions.append(torch.arange(c, c + n))
        slots.append(_slots(seq, c, n, bs))
        ctx.prefills.append(PrefillChunk(start, n, c + n, torch.tensor(seq.block_table)))
        start += n
    ctx.slot_mapping = torch.cat(slots)
    mi = ModelInput(torch.tensor(input_ids, dtype=torch.long), torch.cat(positions), ctx, torch.empty(0),
                    ordered=decodes + prefills)
    rows: list[int] = []
    offset = 0
    for seq, n in mi.ordered:
        c = seq.num_computed_tokens
        req = seq.request
        if seq.index == 0 and req.wants_prompt_logprobs:
            # Hidden state at position p predicts prompt token p + 1.
            first = len(req.prompt_logprobs) - 1  # first position not yet scored
            last = min(c + n, seq.num_prompt_tokens - 1)  # positions [first, last)
            if first >= c and last > first:
                mi.prompt_rows[seq.seq_id] = (len(rows), first, last)
                rows.extend(range(offset + first - c, offset + last - c))
        if c + n == seq.num_tokens:  # the chunk reaches the end: sample the next token
            mi.sample_rows.append(len(rows))
            mi.sampled.append(seq)
            rows.append(offset + n - 1)
        offset += n
    mi.logits_rows = torch.tensor(rows, dtype=torch.long)
    return mi


def build_step(scheduled: list[tuple[Sequence, int]], block_copies: list[tuple[str, int, int]], block_size: int,
               num_micro_batches: int) -> StepInput:
    groups = split_micro_batches(scheduled, num_micro_batches)
    return StepInput(list(block_copies), [build_model_input(g, block_size) for g in groups])


def to_device(mi: ModelInput, device: torch.device) -> ModelInput:
    """The inputs on this rank's device (a no-op on CPU)."""
    if device.type == "cpu":
        return mi
    a = mi.attention
    ctx = AttentionContext(a.slot_mapping.to(device),
                           [DecodeGroup(g.start, g.block_tables.to(device), g.context_lens.to(device))
                            for g in a.decodes],
                           [PrefillChunk(p.start, p.query_len, p.context_len, p.block_table.to(device))
                            for p in a.prefills])
    out = ModelInput(mi.input_ids.to(device), mi.positions.to(device), ctx, mi.logits_rows.to(device))
    return out


def sampled_seqs(step: StepInput) -> list[Sequence]:
    return [s for m in step.micro_batches for s in m.sampled]

