"""The paged KV pool's bookkeeping: which block belongs to whom, and what each cached block holds.
Pure Python, no tensors: the model runner carries out the block copies this module asks for.

A sequence owns a list of block ids (its block table); token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Prefix caching (vLLM's automatic prefix caching): once a block is full and its KV computed, it is
keyed by a hash chain `hash(parent_key, token_ids)`. A new sequence walks its full blocks through
that chain and reuses every block found, so only the rest is computed. A hit is verified, not
trusted: the block must hold the same token ids and descend from the very block matched just
before it (each cached content has a unique id), so a hash collision can never serve another
prefix's KV. A block whose last user finished keeps its KV and sits in an LRU queue; it is
evicted only when a fresh block is needed, least recently used first.

The spill tier (optional) is a second, slower pool. An evicted cached block is copied there
instead of being dropped; a later hit copies it back when the cost model says that is cheaper
than recomputing its tokens.
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import xxhash

from tokenmill.engine.kv_tiers import BlockCopy, CachedContent, SpillCostModel, SpillTier
from tokenmill.engine.sequence import Sequence

logger = logging.getLogger(__name__)

HashFn = Callable[[Optional[int], tuple[int, ...]], int]


def hash_block(parent_key: Optional[int], token_ids: tuple[int, ...]) -> int:
    """The chain key of a full block: its parent's key and its own token ids."""
    h = xxhash.xxh3_64()
    h.update((parent_key if parent_key is not None else 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.intdigest()


@dataclass
class PrefixHit:
    """The reusable prefix of a new sequence, block by block in order: a device block id, or a
    spilled content to copy back."""

    items: list[Union[int, CachedContent]] = field(default_factory=list)
    num_blocks_seen_before: int = 0  # full blocks past the hit whose KV was computed once already

    def num_blocks(self) -> int:
        return len(self.items)

    @property
    def device_blocks(self) -> list[int]:
        return [b for b in self.items if isinstance(b, int)]

    @property
    def num_spilled(self) -> int:
        return sum(1 for b in self.items if not isinstance(b, int))


@dataclass
class CacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found (device or spill tier)
    evictions: int = 0  # cached device blocks given to new content
    swaps_out: int = 0  # blocks copied device -> spill tier
    swaps_in: int = 0  # blocks copied spill tier -> device
    recomputed_tokens: int = 0  # tokens computed again because their cached KV was gone


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_spill_blocks: int = 0, cost_model: Optional[SpillCostModel] = None,
                 hash_fn: HashFn = hash_block) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        if num_spill_blocks and not enable_prefix_caching:
            raise ValueError("the spill tier holds evicted cached blocks; it needs prefix caching on")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.ref_counts = [0] * num_blocks
        self.contents: list[Optional[CachedContent]] = [None] * num_blocks  # what a cached block holds
        # Blocks nobody holds, in eviction order (front first). Cached ones keep their KV there.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain key -> device block id
        self.spill = SpillTier(num_spill_blocks) if num_spill_blocks else None
        self.cost_model = cost_model or SpillCostModel()
        self.stats = CacheStats()
        self._content_ids = itertools.count()
        # Keys of every block ever computed (bounded), to tell a recomputation from a first computation.
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._seen_limit = 1 << 20
        self.pending_copies: list[BlockCopy] = []

    # -- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take (free, or cached and evictable)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by running sequences."""
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache lookup --------------------------------------------------------------
    def _block_keys(self, seq: Sequence, num_full: int) -> list[int]:
        """Chain keys of seq's first num_full blocks (memoised on the sequence)."""
        keys = seq.block_keys
        bs = self.block_size
        while len(keys) < num_full:
            i = len(keys)
            keys.append(self.hash_fn(keys[-1] if keys else None, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return keys[:num_full]

    def find_prefix(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix of seq, at whole blocks, leaving at least one token to compute."""
        hit = PrefixHit()
        if seq.num_computed_tokens or (seq.index == 0 and seq.request.wants_prompt_logprobs):
            return hit  # prompt logprobs need every prompt position computed, as in vLLM
        bs = self.block_size
        num_full = (seq.num_tokens - 1) // bs  # the last token must be computed to get logits
        parent_cid: Optional[int] = None
        keys = self._block_keys(seq, num_full)
        if not self.enable_prefix_caching:  # still count what a cache would have saved
            hit.num_blocks_seen_before = sum(1 for k in keys if k in self._seen)
            return hit
        for i, key in enumerate(keys):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block = self.cached.get(key)
            content = self.contents[block] if block is not None else None
            if content is not None and content.matches(tokens, parent_cid):
                hit.items.append(block)
            else:
                content = self.spill.lookup(key, tokens, parent_cid) if self.spill else None
                if content is None or not self.cost_model.swap_in_is_cheaper(bs):
                    hit.num_blocks_seen_before = sum(1 for k in keys[i:] if k in self._seen)
                    break
                hit.items.append(content)
            parent_cid = content.cid
        return hit

    def cached_prefix_tokens(self, token_ids: "list[int] | tuple[int, ...]",
                             keys: Optional[list[int]] = None) -> int:
        """Leading tokens of token_ids whose KV the device cache holds now, at whole blocks, the
        last token always left to compute: what a prompt would not have to prefill. An estimate
        for the bouncer (chain keys only: no content check, no spill tier); it only reads, so the
        server's event loop may call it while the engine thread runs. `keys` memoises the chain."""
        if not self.enable_prefix_caching:
            return 0
        keys = [] if keys is None else keys
        bs, n = self.block_size, 0
        for i in range((len(token_ids) - 1) // bs):
            if i == len(keys):
                keys.append(self.hash_fn(keys[-1] if keys else None, tuple(token_ids[i * bs:(i + 1) * bs])))
            if keys[i] not in self.cached:
                break
            n += bs
        return n

    # -- allocation -----------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, hit: Optional[PrefixHit] = None) -> bool:
        hit = hit or PrefixHit()
        held = len(seq.block_table) + hit.num_blocks()
        need = max(0, self.blocks_for_tokens(seq.num_computed_tokens + hit.num_blocks() * self.block_size
                                             + num_new_tokens) - held) + hit.num_spilled
        # Device hits sitting in the free queue stop being free once this sequence holds them.
        evictable_hits = sum(1 for b in hit.device_blocks if self.ref_counts[b] == 0)
        return need <= len(self.free_queue) - evictable_hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, hit: Optional[PrefixHit] = None) -> bool:
        """Give seq the hit blocks (if any) and slots for num_new_tokens more. False if the pool is short.

        With a hit, seq.num_computed_tokens advances past the reused prefix.
        """
        if not self.can_allocate(seq, num_new_tokens, hit):
            return False
        if hit is not None:
            self.stats.queries += seq.num_tokens
            self.stats.hits += hit.num_blocks() * self.block_size
            self.stats.recomputed_tokens += hit.num_blocks_seen_before * self.block_size
        if hit is not None and hit.num_blocks():
            # Hold every device hit and reserve every spilled one before taking any fresh block:
            # taking one may evict (and spill) other blocks, which must not push a hit out.
            reserved = {}
            for item in hit.items:
                if isinstance(item, int):
                    self._hold(item)
                else:
                    reserved[item.cid] = self.spill.take(item)
            for item in hit.items:
                if isinstance(item, int):
                    seq.block_table.append(item)
                    seq.block_cids.append(self.contents[item].cid)
                    continue
                block = self._take_free_block()
                self.pending_copies.append(BlockCopy("in", reserved[item.cid], block))
                self._register(block, item)
                seq.block_table.append(block)
                seq.block_cids.append(item.cid)
                self.stats.swaps_in += 1
            if reserved:  # the copies back are queued ahead of any later copy into these slots
                self.spill.release(list(reserved.values()))
            seq.num_computed_tokens += hit.num_blocks() * self.block_size
        need = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(max(0, need)):
            seq.block_table.append(self._take_free_block())
        return True

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)  # least recently used first
        content = self.contents[block]
        if content is not None:  # evict: its KV is about to be overwritten
            del self.cached[content.key]
            self.contents[block] = None
            self.stats.evictions += 1
            spill_block = self.spill.put(content) if self.spill is not None else None
            if spill_block is not None:
                self.pending_copies.append(BlockCopy("out", block, spill_block))
                self.stats.swaps_out += 1
        self.ref_counts[block] = 1
        return block

    def _register(self, block: int, content: CachedContent) -> None:
        self.contents[block] = content
        self.cached[content.key] = block

    # -- after a step ---------------------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's newly full, computed blocks so later sequences can reuse them."""
        bs = self.block_size
        if not self.enable_prefix_caching:  # nothing is kept, but recomputation is still counted
            for key in self._block_keys(seq, min(seq.num_computed_tokens // bs, len(seq.block_table))):
                self._mark_seen(key)
            return
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        keys = self._block_keys(seq, num_full)
        for i in range(len(seq.block_cids), num_full):
            parent_cid = seq.block_cids[-1] if seq.block_cids else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            existing = self.cached.get(keys[i])
            if existing is not None:
                content = self.contents[existing]
                if not content.matches(tokens, parent_cid):
                    return  # a true hash collision: leave this block and its successors uncached
                # Another sequence cached the same KV first; ours stays an uncached duplicate.
            else:
                content = CachedContent(keys[i], tokens, parent_cid, next(self._content_ids))
                self._register(seq.block_table[i], content)
                if self.spill is not None:  # one tier per key: the fresh device copy wins
                    self.spill.discard(keys[i])
                self._mark_seen(keys[i])
            seq.block_cids.append(content.cid)

    def _mark_seen(self, key: int) -> None:
        self._seen[key] = None
        if len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (finish, abort or preemption). Cached ones keep their KV."""
        # In reverse, so a sequence's tail (least likely to be shared) is evicted before its head.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.contents[block] is None:  # holds nothing worth keeping: reuse it first
                    self.free_queue.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_cids = []

    def take_copies(self) -> list[BlockCopy]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
