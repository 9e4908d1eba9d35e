"""The paged KV pool's bookkeeping: which block belongs to whom. Pure Python, no tensors.

The pool holds `num_blocks` blocks of `block_size` token slots each. A sequence owns a list of
block ids (its block table); token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`.
"""
from __future__ import annotations

import logging
from collections import deque

from tokenmill.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences (0..1)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` still needs so that `num_new_tokens` more tokens have slots."""
        needed = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq's block table to hold `num_new_tokens` more tokens. False if the pool is short."""
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > len(self.free_block_ids):
            return False
        for _ in range(n):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` to the pool (finish, abort or preemption)."""
        # Freed in reverse so the tail blocks, least likely to be shared later, are reused first.
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] < 0:
                raise RuntimeError(f"block {block_id} freed twice")
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
