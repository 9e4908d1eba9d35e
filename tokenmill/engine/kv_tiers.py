"""What a cached block holds, the spill tier's bookkeeping, the copies between the tiers, and the
cost model choosing between copying a spilled block back and recomputing its tokens."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional


class BlockCopy(NamedTuple):
    """One KV block copy, run before the step's forward: "out" copies pool block `src` to spill
    block `dst`, "in" copies spill block `src` back into pool block `dst`."""

    direction: Literal["out", "in"]
    src: int
    dst: int


@dataclass(frozen=True)
class CachedContent:
    """The identity of one cached block's KV: its chain key, tokens, and parent content."""

    key: int
    token_ids: tuple[int, ...]
    parent_cid: Optional[int]  # cid of the block before it (None for a sequence's first block)
    cid: int  # unique per content, so a child names exactly the parent it was computed after

    def matches(self, token_ids: tuple[int, ...], parent_cid: Optional[int]) -> bool:
        return self.token_ids == token_ids and self.parent_cid == parent_cid


@dataclass
class SpillCostModel:
    """Copy a spilled block back, or recompute it? Whichever takes less time.

    copy:      num_tokens * kv_bytes_per_token / link_bandwidth
    recompute: num_tokens * flops_per_token / device_flops
    The defaults are the 2-core CPU development machine (a memcpy at ~10 GB/s, prefill at
    ~100 GFLOP/s); on a GPU, link_bandwidth is PCIe's (~25 GB/s) and device_flops the GPU's.
    """

    kv_bytes_per_token: int = 0
    flops_per_token: float = 0.0  # ~2 x parameters
    link_bandwidth: float = 10e9  # bytes/s between the tiers
    device_flops: float = 1e11  # FLOP/s achieved when recomputing

    def __post_init__(self) -> None:
        if self.link_bandwidth <= 0 or self.device_flops <= 0:
            raise ValueError("link_bandwidth and device_flops must be positive")

    def copy_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.link_bandwidth

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.flops_per_token / self.device_flops

    def swap_in_is_cheaper(self, num_tokens: int) -> bool:
        return self.copy_seconds(num_tokens) < self.recompute_seconds(num_tokens)


class SpillTier:
    """A second pool of blocks holding evicted cached KV, least recently spilled evicted first."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0, 1, 2, ...
        self.lru: OrderedDict[int, CachedContent] = OrderedDict()  # spill block -> content
        self.by_key: dict[int, int] = {}
        self.evictions = 0

    @property
    def num_used_blocks(self) -> int:
        return len(self.lru)

    def lookup(self, key: int, token_ids: tuple[int, ...], parent_cid: Optional[int]) -> Optional[CachedContent]:
        block = self.by_key.get(key)
        if block is None:
            return None
        content = self.lru[block]
        return content if content.matches(token_ids, parent_cid) else None

    def put(self, content: CachedContent) -> Optional[int]:
        """Find room for content (evicting the oldest spilled block if full); return its block.
        None when every slot is reserved by copies back in flight: the content is then dropped."""
        if not self.free:
            if not self.lru:
                return None
            old_block, old = self.lru.popitem(last=False)
            del self.by_key[old.key]
            self.free.append(old_block)
            self.evictions += 1
        block = self.free.pop()
        self.lru[block] = content
        self.by_key[content.key] = block
        return block

    def discard(self, key: int) -> None:
        """Drop the spilled copy of a key that was computed again on the device."""
        block = self.by_key.pop(key, None)
        if block is not None:
            del self.lru[block]
            self.free.append(block)

    def take(self, content: CachedContent) -> int:
        """Remove content (it is being copied back to the device) and reserve its block: the slot
        is not reused until `release`, after the copy back has been queued."""
        block = self.by_key.pop(content.key)
        del self.lru[block]
        return block

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)
