"""Which replica a request goes to: round-robin, least-load, or cache-aware (SGLang's router).

Every policy returns the healthy replicas in the order to try them: those in the request's
region with room first, then those elsewhere with room, then the full ones (a replica queueing
with its KV cache full would only queue the request or refuse it; it is still tried last, since
its gauges are up to one poll old and its own 503 is the last word).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from tokenmill.router.config import RouterConfig
from tokenmill.router.prefix_index import PrefixIndex
from tokenmill.router.replicas import Replica

logger = logging.getLogger(__name__)


@dataclass
class Route:
    candidates: list[Replica]  # best first; the proxy tries them in turn
    affinity: bool = False  # the first was chosen because it holds the request's prefix


class Policy:
    """What the policies share: health and region filtering, and a per-request rotation."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._tick = -1

    def route(self, replicas: list[Replica], prompt: str, region: Optional[str]) -> Route:
        """The healthy replicas in the order to try them.

        Args:
            replicas: the whole fleet (unhealthy ones are left out here).
            prompt: the request's routing text (router/prompt_text.py).
            region: the region the request prefers, or None for no preference.
        Returns:
            the Route; no candidates when no replica is healthy.
        """
        self._tick += 1  # once per request, so both region groups rotate in step
        healthy = [r for r in replicas if r.healthy]
        local = [r for r in healthy if region is None or r.region == region]
        remote = [r for r in healthy if region is not None and r.region != region]
        first, affinity = self.order(local, prompt)
        rest, _ = self.order(remote, prompt)
        kv_full = self.config.kv_full_threshold
        ordered = [r for r in first + rest if r.has_room(kv_full)] + [r for r in first + rest if not r.has_room(kv_full)]
        return Route(ordered, affinity and bool(first) and ordered[0] is first[0])

    def order(self, group: list[Replica], prompt: str) -> tuple[list[Replica], bool]:
        """One region group's replicas in the order to try them, and whether the first is there
        for its cache."""
        raise NotImplementedError

    def rotated(self, group: list[Replica]) -> list[Replica]:
        k = self._tick % len(group) if group else 0
        return group[k:] + group[:k]

    def served(self, text: str, replica: Replica) -> None:
        """`replica` has just served (or finished) a request whose routing text is `text`."""


class RoundRobin(Policy):
    """Each request starts one replica further along."""

    def order(self, group: list[Replica], prompt: str) -> tuple[list[Replica], bool]:
        return self.rotated(group), False


class LeastLoad(Policy):
    """The replica with the fewest requests per unit of weight (running + waiting + the router's
    own in flight); ties rotate, so an idle fleet is not all sent to its first replica."""

    def order(self, group: list[Replica], prompt: str) -> tuple[list[Replica], bool]:
        return sorted(self.rotated(group), key=lambda r: r.load), False  # sorted() is stable: ties keep the rotation


class CacheAware(LeastLoad):
    """To the replica that holds the longest prefix of the request, when it holds enough of it
    and the fleet is balanced; otherwise to the least loaded."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.index = PrefixIndex(config.chunk_chars, config.max_index_chunks)

    def imbalanced(self, group: list[Replica]) -> bool:
        """SGLang's test: both the gap and the ratio between the most and least loaded are too big."""
        loads = [r.load for r in group]
        hi, lo = max(loads), min(loads)
        c = self.config
        return hi - lo > c.balance_abs_threshold and hi > c.balance_rel_threshold * lo

    def order(self, group: list[Replica], prompt: str) -> tuple[list[Replica], bool]:
        ranked, _ = super().order(group, prompt)
        if len(group) < 2 or not prompt:
            return ranked, False
        if self.imbalanced(group):
            logger.debug("fleet imbalanced; routing by load")
            return ranked, False
        matches = self.index.match(prompt)
        # Longest match; among equal matches, the less loaded (ranked is by load).
        best = max(ranked, key=lambda r: matches.get(r.url, 0.0))
        fraction = matches.get(best.url, 0.0)
        if fraction > 0.0 and fraction >= self.config.cache_threshold:
            return [best] + [r for r in ranked if r is not best], True
        return ranked, False

    def served(self, text: str, replica: Replica) -> None:
        self.index.insert(text, replica.url)


def make_policy(config: RouterConfig) -> Policy:
    return {"round-robin": RoundRobin, "least-load": LeastLoad, "cache-aware": CacheAware}[config.policy](config)
