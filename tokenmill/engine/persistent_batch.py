"""Every rank's view of the running sequences, kept from step to step (vLLM's persistent batch).

Rank 0 sends each step only what changed (`BatchDiff`): the sequences seen for the first time with
their block tables, the blocks appended to known ones, and the sequences gone. Every rank applies
it to its `PersistentBatch`, whose block-table rows then give the step's tensors (positions, pool
slots, tables, context lengths) in a few vectorized ops. So the message and the host work of a step
grow with the batch, not with the contexts: a decode step sends one token id and, once every
block_size tokens, one block id per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.engine.sequence import Sequence


@dataclass
class BatchDiff:
    """What changed in the running set since the previous step."""

    added: list[tuple[int, list[int]]] = field(default_factory=list)  # (seq id, whole block table)
    appended: list[tuple[int, list[int]]] = field(default_factory=list)  # (seq id, new blocks)
    removed: list[int] = field(default_factory=list)  # seq ids whose blocks were freed


class BatchDiffer:
    """Rank 0: what each rank's persistent batch knows, and the diff that brings it up to date.

    A sequence's block table only grows while it holds its blocks; freeing them (finish, abort,
    preemption) gives it a new, empty list (BlockManager.free). So a table that is no longer the
    list object last seen was freed: the sequence is removed, or re-added if it runs again now.
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[Sequence, list[int], int]] = {}  # seq id -> (seq, table, blocks sent)

    def diff(self, scheduled: list[Sequence]) -> BatchDiff:
        out = BatchDiff()
        now = {s.seq_id for s in scheduled}
        for sid, (seq, table, _) in list(self._known.items()):
            if seq.block_table is not table and sid not in now:
                del self._known[sid]
                out.removed.append(sid)
        for seq in scheduled:
            known = self._known.get(seq.seq_id)
            table = seq.block_table
            if known is None or known[1] is not table:
                out.added.append((seq.seq_id, list(table)))
            elif len(table) > known[2]:
                out.appended.append((seq.seq_id, table[known[2]:]))
            self._known[seq.seq_id] = (seq, table, len(table))
        return out

    def __len__(self) -> int:
        return len(self._known)


class PersistentBatch:
    """Block-table rows of the known sequences, one row each, grown as needed."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.rows: dict[int, int] = {}  # seq id -> row
        self._free_rows: list[int] = []
        self.tables = torch.zeros(8, 16, dtype=torch.long)
        self.num_blocks = [0] * 8

    def apply(self, diff: BatchDiff) -> None:
        for sid in diff.removed:
            self._free_rows.append(self.rows.pop(sid))
        for sid, blocks in diff.added:
            row = self.rows.get(sid)
            if row is None:
                row = self.rows[sid] = self._take_row()
            self.num_blocks[row] = 0
            self._extend(row, blocks)
        for sid, blocks in diff.appended:
            self._extend(self.rows[sid], blocks)

    def _take_row(self) -> int:
        if not self._free_rows:
            n = self.tables.shape[0]
            self.tables = torch.cat([self.tables, torch.zeros_like(self.tables)])
            self.num_blocks.extend([0] * n)
            self._free_rows.extend(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    def _extend(self, row: int, blocks: list[int]) -> None:
        if not blocks:
            return
        start, end = self.num_blocks[row], self.num_blocks[row] + len(blocks)
        if end > self.tables.shape[1]:
            width = max(end, 2 * self.tables.shape[1])
            grown = torch.zeros(self.tables.shape[0], width, dtype=torch.long)
            grown[:, :self.tables.shape[1]] = self.tables
            self.tables = grown
        self.tables[row, start:end] = torch.tensor(blocks, dtype=torch.long)
        self.num_blocks[row] = end

    def step_tensors(self, seq_ids: list[int], num_computed: list[int],
                     query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions [T], slot_mapping [T], block_tables [S, W], context_lens [S]) for sequences
        that compute query_lens[i] tokens from position num_computed[i], in this order."""
        bs = self.block_size
        rows = [self.rows[sid] for sid in seq_ids]
        computed = torch.tensor(num_computed, dtype=torch.long)
        qlens = torch.tensor(query_lens, dtype=torch.long)
        context_lens = computed + qlens
        for r, c in zip(rows, (context_lens + bs - 1).div(bs, rounding_mode="floor").tolist()):
            if self.num_blocks[r] < c:  # the block manager allocates before scheduling: a bug if not
                raise RuntimeError(f"persistent batch row {r} has {self.num_blocks[r]} blocks, needs {c}")
        width = -(-int(context_lens.max()) // bs)
        tables = self.tables.index_select(0, torch.tensor(rows, dtype=torch.long))[:, :width]
        seq_of = torch.repeat_interleave(torch.arange(len(rows)), qlens)
        starts = torch.cumsum(qlens, 0) - qlens  # first flat row of each sequence
        positions = torch.arange(int(qlens.sum())) - (starts - computed)[seq_of]
        slots = tables[seq_of, positions // bs] * bs + positions % bs
        return positions, slots, tables.contiguous(), context_lens
