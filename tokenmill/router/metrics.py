"""Every metric the router exports, defined once, prefixed `tokenmill_router:` (a replica's are
`tokenmill:`, so one Prometheus can scrape both without clashes)."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.router.replicas import Replica, ReplicaSet

PREFIX = "tokenmill_router:"
RETRY_REASONS = ("connect_error", "timeout", "server_error", "at_capacity", "stream_start", "replica_lost")
REFUSAL_REASONS = ("at_capacity", "no_healthy_replica", "replicas_failed", "bad_request", "auth")


class _ReplicaGauges(Collector):
    """Health and load of each replica, read from the ReplicaSet when scraped (never stale)."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.replicas = replicas

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["replica", "region"]
        healthy = GaugeMetricFamily(f"{PREFIX}replica_healthy", "1 if the replica passed its last check.", labels=labels)
        load = GaugeMetricFamily(f"{PREFIX}replica_load",
                                 "Running + waiting + router in-flight requests, per unit of weight.", labels=labels)
        in_flight = GaugeMetricFamily(f"{PREFIX}replica_in_flight", "Requests the router has open on the replica.",
                                      labels=labels)
        for r in self.replicas.replicas:
            values = [r.url, r.region or ""]
            healthy.add_metric(values, 1.0 if r.healthy else 0.0)
            load.add_metric(values, r.load)
            in_flight.add_metric(values, r.in_flight)
        yield from (healthy, load, in_flight)


class RouterMetrics:
    def __init__(self, replicas: ReplicaSet) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}requests", "Requests answered by each replica (any status).", ["replica"],
                                registry=r)
        self.affinity_hits = Counter(f"{PREFIX}cache_affinity_hits",
                                     "Requests sent to a replica because it holds their prefix.", ["replica"],
                                     registry=r)
        self.retries = Counter(f"{PREFIX}retries",
                               "Attempts that failed on a replica before any byte reached the client, so the "
                               "request moved on to the next replica, by reason.", ["replica", "reason"], registry=r)
        self.stream_failures = Counter(f"{PREFIX}stream_failures",
                                       "Streams a replica broke off after the client had received part of them.",
                                       ["replica"], registry=r)
        self.refusals = Counter(f"{PREFIX}refusals", "Requests the router answered with an error itself, by reason.",
                                ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for replica in replicas.replicas:
            self.track(replica)
        replicas.on_added.append(self.track)  # replicas found later, by --replicas-file or --replicas-dns
        r.register(_ReplicaGauges(replicas))

    def track(self, replica: Replica) -> None:
        """Create the replica's series at 0, so a rate() over them starts from its first scrape."""
        self.requests.labels(replica.url)
        self.affinity_hits.labels(replica.url)
        self.stream_failures.labels(replica.url)
        for reason in RETRY_REASONS:
            self.retries.labels(replica.url, reason)
