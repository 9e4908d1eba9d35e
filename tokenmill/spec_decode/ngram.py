"""N-gram prompt lookup: propose what followed the last time the sequence's tail occurred.

Text that quotes, edits or summarises its prompt repeats it, so the tokens after an earlier
occurrence of the last n tokens are a cheap, often right guess. No model runs: the proposal is a
search over the sequence's own tokens (prompt and output), longest n first, most recent match
first (it is the likeliest to continue the same way).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.lo, self.hi = prompt_lookup_min, prompt_lookup_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        lo..hi tokens; [] when none occurred."""
        total = len(token_ids)
        if k < 1 or total < self.lo + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.hi, total - 1), self.lo - 1, -1):
            suffix = tokens[total - n:]
            # Windows starting at 0..total-n-1: every earlier occurrence, not the suffix itself.
            windows = sliding_window_view(tokens[:total - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                hit = int(hits[-1])
                # What followed the match; where that runs into the tail itself, the text repeats
                # with period d (a loop, or a list being continued), so the guess goes on with it.
                d = total - n - hit
                out = tokens[hit + n:hit + n + k].tolist()
                while len(out) < k:
                    out.append(out[len(out) - d])  # the slice above holds min(k, d) tokens
                return out
        return []
