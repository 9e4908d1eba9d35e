"""Fair shares of one model's capacity between API keys, and the book of admitted requests.

Every admitted engine request is entered here under its key (anonymous traffic is one key,
"anonymous") and taken out when it ends, whichever way: finished, aborted, client gone, engine
error (OpenAIServing releases it; a request whose stream never started is released when its Job is
garbage-collected). The book also tells the wait estimate which admitted requests the engine has
not taken in yet.

Shares are work-conserving: a key's share is capacity x its weight / the summed weights of the
*active* keys, itself included. Active: with requests in progress, or whose last one ended less
than RETURN_GRACE_S ago (a client sending one request after another keeps its share between
them), or refused at capacity and due back (its Retry-After, at most --max-queue-wait, plus the
grace). A key alone may use the whole server; when another key turns up, the first is held to
its share (new requests refused until it is back within it) and the room its requests free as
they end goes to the others.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from tokenmill.server.queue_wait import SeqLoad

ANONYMOUS = "anonymous"
# A key keeps its claim on a share this long after its last request ended, or after it is due
# back from a refusal (its Retry-After): the time a client takes to send its next request.
RETURN_GRACE_S = 2.0


@dataclass
class _Admitted:
    key_id: str
    seqs: tuple[SeqLoad, ...]
    seen: bool = False  # in a LoadView: from then on the view, not the book, describes it


class FairShares:
    def __init__(self, capacity: int, on_count: Optional[Callable[[str, int], None]] = None) -> None:
        self.capacity = capacity  # requests running + queued (--max-num-queued-reqs)
        self.on_count = on_count  # told each key's new count (the metrics gauge)
        # Re-entrant: admission holds it across its check and the entry of what it admits.
        self.lock = threading.RLock()
        self._book: dict[str, _Admitted] = {}  # request id -> entry, in admission order
        self._counts: dict[str, int] = {}
        self._weights: dict[str, float] = {}  # the latest weight seen of each key
        self._returning: dict[str, float] = {}  # refused key -> when it stops counting as active

    # -- the book --------------------------------------------------------------------------
    def add(self, key_id: str, weight: float, request_id: str, seqs: tuple[SeqLoad, ...]) -> None:
        with self.lock:
            if request_id in self._book:
                raise ValueError(f"request id {request_id!r} is already admitted")
            self._book[request_id] = _Admitted(key_id, seqs)
            self._counts[key_id] = self._counts.get(key_id, 0) + 1
            self._weights[key_id] = weight
            self._told(key_id)

    def release(self, *request_ids: str, now: Optional[float] = None) -> None:
        """Idempotent: every path that ends a request may call it."""
        with self.lock:
            for rid in request_ids:
                entry = self._book.pop(rid, None)
                if entry is None:
                    continue
                key = entry.key_id
                self._counts[key] -= 1
                if not self._counts[key]:
                    del self._counts[key]
                    until = (time.monotonic() if now is None else now) + RETURN_GRACE_S
                    self._returning[key] = max(until, self._returning.get(key, 0.0))
                self._told(key)

    def _told(self, key_id: str) -> None:
        if self.on_count is not None:
            self.on_count(key_id, self._counts.get(key_id, 0))

    @property
    def total(self) -> int:
        with self.lock:
            return len(self._book)

    def count(self, key_id: str) -> int:
        with self.lock:
            return self._counts.get(key_id, 0)

    def ids(self) -> set[str]:
        with self.lock:
            return set(self._book)

    def ids_of(self, key_id: str) -> set[str]:
        with self.lock:
            return {rid for rid, e in self._book.items() if e.key_id == key_id}

    def mark_seen(self, request_id: str) -> None:
        """The engine has taken the request in (its first output came): the view, not the book,
        describes it from now on, even if it ends before the next capacity check looks."""
        with self.lock:
            entry = self._book.get(request_id)
            if entry is not None:
                entry.seen = True

    def unseen(self, view_ids: frozenset[str]) -> list[SeqLoad]:
        """Sequences of admitted requests the engine had not taken in at its last turn, in
        admission order. One that was seen and is gone has ended; its release is on the way."""
        out: list[SeqLoad] = []
        with self.lock:
            for rid, entry in self._book.items():
                if not entry.seen and rid in view_ids:
                    entry.seen = True
                if not entry.seen:
                    out.extend(entry.seqs)
        return out

    # -- shares ----------------------------------------------------------------------------
    def note_refused(self, key_id: str, weight: float, until: float) -> None:
        """A key refused at capacity still wants its share: it counts as active until `until`."""
        with self.lock:
            self._weights[key_id] = weight
            self._returning[key_id] = max(until, self._returning.get(key_id, 0.0))

    def _active(self, now: float) -> set[str]:
        for key, until in list(self._returning.items()):
            if until <= now:
                del self._returning[key]
        return set(self._counts) | set(self._returning)

    def share(self, key_id: str, weight: float, now: float) -> int:
        """Requests (running + queued) this key may hold now: at least one."""
        with self.lock:
            weights = {k: self._weights[k] for k in self._active(now)} | {key_id: weight}
            return max(1, math.ceil(self.capacity * weight / sum(weights.values()) - 1e-9))

    def over_share(self, key_id: str, weight: float, n: int, now: float) -> Optional[tuple[int, int]]:
        """(requests held, share) when n more would take this key past its share while another key
        is active; None when they may go in (work-conserving: alone, a key's share is everything)."""
        with self.lock:
            if not self._active(now) - {key_id}:
                return None
            held, allowed = self._counts.get(key_id, 0), self.share(key_id, weight, now)
            return (held, allowed) if held + n > allowed else None

    def snapshot(self) -> dict[str, int]:
        """Requests held per key (for tests and logs)."""
        with self.lock:
            return dict(self._counts)
