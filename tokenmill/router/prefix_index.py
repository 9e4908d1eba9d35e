"""Which replica served which prompt prefixes: the router's guess at every replica's KV cache.

The router does not load the tokenizer, so it cannot hash KV blocks as a replica does; it hashes
fixed-size character chunks of the request's text instead, as a chain (a chunk's key folds in its
parent's, so a key names the whole prefix up to it, as the block manager's keys do). Prompts that
share their first k chunks share their first k keys.
"""
from __future__ import annotations

from collections import OrderedDict

import xxhash


class PrefixIndex:
    """A bounded LRU map from prefix-chunk keys to the replicas that served that prefix."""

    def __init__(self, chunk_chars: int = 64, max_chunks: int = 200_000) -> None:
        if chunk_chars < 1 or max_chunks < 1:
            raise ValueError("chunk_chars and max_chunks must be >= 1")
        self.chunk_chars = chunk_chars
        self.max_chunks = max_chunks
        # key -> replicas that served the prefix ending at this chunk (a dict as an ordered set)
        self._chunks: OrderedDict[int, dict[str, None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def _keys(self, text: str) -> list[tuple[int, int]]:
        """(key, end offset) of each chunk; the last may be shorter than chunk_chars."""
        keys, parent = [], 0
        for start in range(0, len(text), self.chunk_chars):
            chunk = text[start:start + self.chunk_chars]
            parent = xxhash.xxh3_64_intdigest(chunk.encode("utf-8", "surrogatepass"), seed=parent)
            keys.append((parent, start + len(chunk)))
        return keys

    def match(self, text: str) -> dict[str, float]:
        """The fraction of `text` (in characters) each replica is known to hold as a prefix.

        Args:
            text: the request's routing text (router/prompt_text.py).
        Returns:
            replica URL -> matched fraction in (0, 1]; replicas with no match are absent.
        """
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        hit: list[int] = []
        for key, end in self._keys(text):
            holders = self._chunks.get(key)
            if holders is None:
                break
            alive = set(holders) if alive is None else alive & holders.keys()
            if not alive:
                break
            hit.append(key)
            for replica in alive:
                matched[replica] = end
        for key in reversed(hit):  # leaf first: see insert()
            self._chunks.move_to_end(key)
        return {replica: end / len(text) for replica, end in matched.items()}

    def insert(self, text: str, replica: str) -> None:
        """Record that `replica` now holds the KV of `text` (it has just served it)."""
        # NOTE: touched leaf first, root last, so a chain's root is its most recently used key and
        # eviction takes leaves before the prefixes they hang from (as the KV cache's LRU does).
        for key, _ in reversed(self._keys(text)):
            holders = self._chunks.get(key)
            if holders is None:
                self._chunks[key] = {replica: None}
            else:
                holders[replica] = None
                self._chunks.move_to_end(key)
        while len(self._chunks) > self.max_chunks:
            self._chunks.popitem(last=False)
