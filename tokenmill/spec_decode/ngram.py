"""N-gram prompt lookup: propose what followed the last time the sequence's tail occurred.

Text that quotes, edits or summarises its prompt repeats it, so the tokens after an earlier
occurrence of the last n tokens are a cheap, often right guess. No model runs: the proposal is a
search over the sequence's own tokens (prompt and output), longest n first, most recent match
first (it is the likeliest to continue the same way).

The search must cost little next to a decode step, as "auto" looks up every step before it
decides. Each sequence's tokens are kept as 32-bit words in a byte string, extended by the
tokens it gained since the last lookup, and the tail is found with `bytes.rfind` (a C search):
a few microseconds at a thousand tokens, where building a NumPy copy of the tokens and comparing
every window took ~70 (0.55 ms a step at batch 8, an eighth of a small model's step).
"""
from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterable
from typing import Optional

_WORD = array("i").itemsize


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.lo, self.hi = prompt_lookup_min, prompt_lookup_max
        self._words: dict[Hashable, array] = {}  # a sequence's tokens so far, by its key

    def propose(self, token_ids: list[int], k: int, key: Optional[Hashable] = None) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        lo..hi tokens; [] when none occurred. With a key, the sequence's tokens are kept for the
        next lookup (its token_ids only grow); `retain` drops the keys that left."""
        total = len(token_ids)
        if k < 1 or total < self.lo + 1:
            return []
        words = self._words_of(token_ids, key)
        buf = memoryview(words).cast("B")
        data = bytes(buf)
        for n in range(min(self.hi, total - 1), self.lo - 1, -1):
            suffix = data[(total - n) * _WORD:]
            # Starts 0..total-n-1: every earlier occurrence, not the suffix itself.
            end = (total - 1) * _WORD
            hit = data.rfind(suffix, 0, end)
            while hit >= 0 and hit % _WORD:  # a match across token boundaries: look further back
                hit = data.rfind(suffix, 0, hit + len(suffix) - 1)
            if hit >= 0:
                hit //= _WORD
                # What followed the match; where that runs into the tail itself, the text repeats
                # with period d (a loop, or a list being continued), so the guess goes on with it.
                d = total - n - hit
                out = list(words[hit + n:hit + n + k])
                while len(out) < k:
                    out.append(out[len(out) - d])  # the slice above holds min(k, d) tokens
                return out
        return []

    def _words_of(self, token_ids: list[int], key: Optional[Hashable]) -> array:
        words = self._words.get(key) if key is not None else None
        if words is None or len(words) > len(token_ids) or (len(words) and words[-1] != token_ids[len(words) - 1]):
            words = array("i", token_ids)
        else:
            words.extend(token_ids[len(words):])
        if key is not None:
            self._words[key] = words
        return words

    @property
    def num_kept(self) -> int:
        return len(self._words)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Forget the tokens of sequences not in keys (finished, aborted, preempted)."""
        keep = set(keys)
        for key in [k for k in self._words if k not in keep]:
            del self._words[key]
