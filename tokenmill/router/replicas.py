"""The replicas behind the router: where each is, whether it is healthy, and how loaded it is.

A ReplicaSet polls every replica's /health and /metrics on a fixed interval. One failed check (or
a refused connection seen by the proxy) takes a replica out; one passing check puts it back.
NOTE: all state here is read and written on the router's event loop only, so it needs no locks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tokenmill.router.discovery import Discovery

logger = logging.getLogger(__name__)

# The load gauges a `tokenmill serve` replica exports (server/metrics.py), one sample per model.
RUNNING, WAITING, KV_USAGE = ("tokenmill:num_requests_running", "tokenmill:num_requests_waiting",
                              "tokenmill:kv_cache_usage_perc")


@dataclass(eq=False)  # identity equality: replicas are dict keys, and two may look alike mid-update
class Replica:
    url: str
    region: Optional[str] = None
    weight: float = 1.0
    # Unknown until the first check; the router checks every replica before it serves.
    healthy: bool = False
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    in_flight: int = 0  # requests the router has sent and not yet seen finish
    last_error: Optional[str] = None
    checked_at: Optional[float] = None  # time.time() of the last check
    # Set when a health check fails: requests waiting on the replica stop waiting and move on
    # (a hung replica would otherwise hold them for the whole upstream timeout). A new Event
    # once it is healthy again.
    lost: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")) or len(self.url.split("://", 1)[1]) == 0:
            raise ValueError(f"a replica URL must start with http:// or https://; got {self.url!r}")
        if not self.weight > 0:
            raise ValueError(f"replica weight must be > 0; got {self.weight} for {self.url}")

    @property
    def load(self) -> float:
        """Requests on the replica per unit of weight: the larger of what it reported at the last
        poll and what this router has in flight to it. Adding the two would count a request twice
        once the replica reports it (and the gauges change only between engine steps, so a
        replica in a long step would look idle and attract more)."""
        return max(self.running + self.waiting, self.in_flight) / self.weight

    def has_room(self, kv_full: float) -> bool:
        """False when the replica is queueing requests with its KV cache (nearly) full: it would
        only add this one to the queue, or refuse it."""
        return not (self.waiting > 0 and self.kv_cache_usage >= kv_full)

    @classmethod
    def parse(cls, spec: str) -> "Replica":
        """`URL[,region=R][,weight=W]`, as --replica and the replicas file write it."""
        url, fields = split_spec(spec)
        return cls(url, **fields)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        return {"url": self.url, "region": self.region, "weight": self.weight, "healthy": self.healthy,
                "running": self.running, "waiting": self.waiting, "kv_cache_usage": self.kv_cache_usage,
                "in_flight": self.in_flight, "load": self.load, "last_error": self.last_error,
                "checked_at": self.checked_at}


def split_spec(spec: str) -> tuple[str, dict[str, object]]:
    """`WHERE[,region=R][,weight=W]` into WHERE and the options (--replica, --replicas-dns, files)."""
    where, *options = [part.strip() for part in spec.strip().split(",")]
    fields: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("region", "weight") or not value:
            raise ValueError(f"bad replica option {option!r} in {spec!r}: expected region=R or weight=W")
        if key == "weight":
            try:
                fields["weight"] = float(value)
            except ValueError:
                raise ValueError(f"replica weight must be a number; got {value!r} in {spec!r}") from None
        else:
            fields["region"] = value
    return where, fields


def read_replicas_file(path: str) -> list[Replica]:
    """One replica spec a line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read --replicas-file {path!r}: {e}") from None
    return [Replica.parse(line) for line in (raw.split("#", 1)[0].strip() for raw in lines) if line]


def parse_load(text: str) -> tuple[float, float, float]:
    """(running, waiting, KV usage) from a replica's Prometheus text: requests summed over the
    models it serves, KV usage their largest (the models share no pool, the fullest one refuses)."""
    running = waiting = usage = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RUNNING:
                running += sample.value
            elif sample.name == WAITING:
                waiting += sample.value
            elif sample.name == KV_USAGE:
                usage = max(usage, sample.value)
    return running, waiting, usage


class ReplicaSet:
    """The fleet, and the tasks that keep its membership, health and load current."""

    def __init__(self, replicas: list[Replica], interval_s: float = 0.5, timeout_s: float = 1.0,
                 discovery: Optional["Discovery"] = None, discovery_interval_s: float = 5.0) -> None:
        if not replicas and (discovery is None or not discovery.dynamic):
            raise ValueError("the router needs at least one replica (--replica URL, --replicas-file or --replicas-dns)")
        urls = [r.url for r in replicas]
        dup = sorted({u for u in urls if urls.count(u) > 1})
        if dup:
            raise ValueError(f"replica listed twice: {', '.join(dup)}")
        self.replicas = replicas
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.discovery = discovery
        self.discovery_interval_s = discovery_interval_s
        self.on_added: list[Callable[[Replica], None]] = []  # e.g. metrics creating the replica's series
        self._client: Optional[httpx.AsyncClient] = None
        self._pollers: dict[str, asyncio.Task] = {}  # one health poller per replica, by URL
        self._discovery_task: Optional[asyncio.Task] = None

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    async def start(self) -> None:
        """Find and check every replica once (so the first requests see real health), then keep
        polling each, and keep looking for replicas when a source can change."""
        # trust_env=False: replicas are reached directly, never through a proxy from the environment.
        self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
        if self.discovery is not None:
            self.update(await self.discovery.current())
        await self.check_all()
        for r in self.replicas:
            self._watch(r)
        if self.discovery is not None and self.discovery.dynamic:
            self._discovery_task = asyncio.create_task(self._rediscover_forever(), name="router-discovery")

    async def stop(self) -> None:
        tasks = list(self._pollers.values()) + ([self._discovery_task] if self._discovery_task else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pollers.clear()
        if self._client is not None:
            await self._client.aclose()

    def _watch(self, replica: Replica) -> None:
        """Poll the replica on its own: a silent replica (each check waits its whole timeout) must
        not slow the checks of the others, or a second outage would be seen late."""
        if self._client is not None and replica.url not in self._pollers:
            self._pollers[replica.url] = asyncio.create_task(self._poll(replica), name=f"router-health {replica.url}")

    async def _poll(self, replica: Replica) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check(replica)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad round
                logger.exception("health check of %s failed", replica.url)

    async def _rediscover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval_s)
            try:
                await self.rediscover()
            except Exception:  # noqa: BLE001
                logger.exception("replica discovery round failed")

    async def rediscover(self) -> None:
        """Look at the sources again; replicas that joined are checked before they are used."""
        assert self.discovery is not None
        joined = self.update(await self.discovery.current())
        await asyncio.gather(*(self.check(r) for r in joined))
        for r in joined:
            self._watch(r)

    def update(self, found: list[Replica]) -> list[Replica]:
        """Make the fleet `found`, keeping the state (health, load, in-flight) of replicas it had.
        A replica that left keeps serving the requests it has; it just gets no new ones."""
        had = {r.url: r for r in self.replicas}
        fleet, joined = [], []
        for r in found:
            old = had.get(r.url)
            if old is None:
                joined.append(r)
                fleet.append(r)
                logger.info("replica %s joined the fleet", r.url)
                for callback in self.on_added:
                    callback(r)
            else:
                old.region, old.weight = r.region, r.weight
                fleet.append(old)
        for url in had.keys() - {r.url for r in found}:
            logger.info("replica %s left the fleet", url)
            poller = self._pollers.pop(url, None)
            if poller is not None:
                poller.cancel()
        self.replicas = fleet
        return joined

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def check(self, replica: Replica) -> None:
        """One health check: /health must answer 200; /metrics, when it parses, updates the load."""
        assert self._client is not None, "start() first"
        replica.checked_at = time.time()
        try:
            health = await self._client.get(f"{replica.url}/health")
        except httpx.HTTPError as e:
            self.mark_failed(replica, f"health check: {type(e).__name__}: {e}", lost=True)
            return
        if health.status_code != 200:
            self.mark_failed(replica, f"health check: HTTP {health.status_code}", lost=True)
            return
        try:
            metrics = await self._client.get(f"{replica.url}/metrics")
            metrics.raise_for_status()
            replica.running, replica.waiting, replica.kv_cache_usage = parse_load(metrics.text)
        except httpx.TransportError as e:
            # Answered /health, then went silent (a link cut mid-check): as down as a failed /health.
            self.mark_failed(replica, f"metrics: {type(e).__name__}: {e}", lost=True)
            return
        except (httpx.HTTPError, ValueError) as e:
            # Healthy but unreadable load: keep the last numbers rather than fail a serving replica.
            logger.debug("cannot read the load of %s: %s", replica.url, e)
        self.mark_healthy(replica)

    def mark_failed(self, replica: Replica, reason: str, lost: bool = False) -> None:
        """Out of the rotation. `lost` (a failed health check): also stop waiting on it. A
        request's own failure (a refused connection, a 500) does not cut its neighbours short."""
        if replica.healthy:
            logger.warning("replica %s is down: %s", replica.url, reason)
        replica.healthy = False
        replica.last_error = reason
        if lost:
            replica.lost.set()

    def mark_healthy(self, replica: Replica) -> None:
        if not replica.healthy:
            logger.info("replica %s is healthy", replica.url)
        if replica.lost.is_set():
            replica.lost = asyncio.Event()
        replica.healthy = True
        replica.last_error = None
