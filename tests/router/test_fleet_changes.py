"""The fleet as it changes under the router: replicas found in a file it re-reads and behind a DNS
name, replicas that freeze mid-request, replicas whose KV cache is full, and the router checking
the replicas' keys itself."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.router.conftest import CHAT, wait_for
from tokenmill.router.cli import add_args, discovery_from_args
from tokenmill.router.config import RouterConfig
from tokenmill.router.discovery import Discovery, DnsTarget
from tokenmill.router.policy import make_policy
from tokenmill.router.replicas import Replica

HI = [{"role": "user", "content": "hi"}]


def urls(rt) -> set[str]:
    return {r.url for r in rt.fleet.replicas}


def test_replicas_file_is_reread_and_a_bad_edit_keeps_the_last_list(fleet, router, tmp_path):
    a, b = fleet("a", "b")
    path = tmp_path / "replicas.txt"
    path.write_text(f"{a.url}\n")
    rt = router([], specs=[], discovery=Discovery([], str(path)), policy="round-robin", discovery_interval_s=0.1)
    assert urls(rt) == {a.url}
    path.write_text(f"# two now\n{a.url}\n{b.url},region=eu\n")
    wait_for(lambda: b.url in {r.url for r in rt.fleet.healthy()}, 3.0, "b to join and pass its check")
    assert {rt.replica_of(rt.chat(HI)) for _ in range(4)} == {a.url, b.url}
    assert next(r for r in rt.fleet.replicas if r.url == b.url).region == "eu"
    assert rt.metrics()[f"tokenmill_router:requests_total{{replica={b.url}}}"] == 2
    path.write_text(f"{b.url}\nnot-a-url\n")  # a bad edit: ignored, with a warning
    time.sleep(0.4)
    assert urls(rt) == {a.url, b.url}
    path.write_text(f"{b.url}\n")
    wait_for(lambda: urls(rt) == {b.url}, 3.0, "a to leave")
    assert {rt.replica_of(rt.chat(HI)) for _ in range(3)} == {b.url}


def test_dns_name_with_many_addresses_is_followed(fleet, router, monkeypatch):
    """The name resolves to one address per replica (as a Kubernetes headless Service does);
    the router follows it as replicas come and go, and keeps the last answer when DNS fails."""
    a, = fleet("a", host="127.0.0.1")
    b, = fleet("b", host="127.0.0.2", port=a.server.port)  # same port, another address
    answer: list[str] = ["127.0.0.1"]
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kw):
        if host != "replicas.fleet.test":
            return real(host, port, *args, **kw)
        if not answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    target = DnsTarget.parse(f"replicas.fleet.test:{a.server.port},region=us")
    rt = router([], specs=[], discovery=Discovery([], dns=[target]), policy="round-robin", discovery_interval_s=0.1)
    assert urls(rt) == {a.url}
    answer[:] = ["127.0.0.2", "127.0.0.1"]
    wait_for(lambda: len(rt.fleet.healthy()) == 2, 3.0, "the second address to join")
    assert {rt.replica_of(rt.chat(HI)) for _ in range(4)} == {a.url, b.url}
    answer.clear()  # the DNS server fails: the last answer stands
    time.sleep(0.4)
    assert urls(rt) == {a.url, b.url}
    answer[:] = ["127.0.0.2"]
    wait_for(lambda: urls(rt) == {b.url}, 3.0, "the first address to leave")
    assert all(r.region == "us" for r in rt.fleet.replicas)


def test_discovery_specs_and_real_resolution():
    t = DnsTarget.parse("https://tokenmill-replicas.tokenmill.svc.cluster.local:8000,weight=2")
    assert (t.host, t.port, t.scheme, t.weight) == ("tokenmill-replicas.tokenmill.svc.cluster.local", 8000, "https", 2)
    assert DnsTarget.parse("[::1]:9").url("::1") == "http://[::1]:9"
    for bad in ("no-port", "host:http", "ftp://h:1", "h:0", "h:1,zone=x"):
        with pytest.raises(ValueError):
            DnsTarget.parse(bad)
    import asyncio
    found = asyncio.run(DnsTarget("localhost", 8123).resolve())
    assert "http://127.0.0.1:8123" in [r.url for r in found]
    import argparse
    p = argparse.ArgumentParser()
    add_args(p)
    replicas, discovery = discovery_from_args(p.parse_args(["--replicas-dns", "localhost:8000"]))
    assert replicas == [] and discovery.dynamic
    with pytest.raises(ValueError, match="at least one replica"):
        from tokenmill.router.replicas import ReplicaSet
        ReplicaSet([], discovery=Discovery([]))


def test_frozen_replica_is_left_within_a_health_check(fleet, router):
    """A replica that stops answering altogether (its health checks too) does not hold the
    requests waiting on it for the whole upstream timeout: they move on, or end with an error
    event, once a health check fails."""
    a, b = fleet("a", "b")
    b.running = 5  # least-load sends to a first
    rt = router([a, b], policy="least-load", health_timeout_s=0.5, upstream_timeout_s=30)
    wait_for(lambda: rt.fleet.replicas[1].running == 5, 3.0, "b's load to be polled")
    a.mode = "frozen"
    start = time.monotonic()
    r = rt.chat(HI)
    assert rt.replica_of(r) == b.url and time.monotonic() - start < 2.5
    assert rt.metrics()[f"tokenmill_router:retries_total{{reason=replica_lost,replica={a.url}}}"] == 1
    a.mode = "ok"
    wait_for(lambda: rt.fleet.replicas[0].healthy, 3.0, "a to come back")
    a.chunks, a.chunk_delay = 50, 0.05
    body = {"model": "demo", "stream": True, "messages": HI}
    with rt.client.stream("POST", CHAT, json=body) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data:") and s.headers["x-tokenmill-replica"] == a.url
        a.mode = "frozen"
        start = time.monotonic()
        rest = [line for line in lines if line]
    assert time.monotonic() - start < 2.5 and rest[-1] == "data: [DONE]"
    assert "health check" in json.loads(rest[-2][len("data: "):])["error"]["message"]
    a.mode = "ok"
    wait_for(lambda: rt.fleet.replicas[0].in_flight == 0, 3.0, "the router to close the frozen stream")


def test_replica_with_full_kv_cache_is_tried_last():
    config = RouterConfig(policy="least-load")
    full = Replica("http://full", healthy=True, waiting=1, kv_cache_usage=0.99)
    busy = Replica("http://busy", healthy=True, running=3)
    remote = Replica("http://remote", region="eu", healthy=True, running=9)
    route = make_policy(config).route([full, busy, remote], "prompt", None)
    assert [r.url for r in route.candidates] == ["http://busy", "http://remote", "http://full"]
    full.kv_cache_usage = 0.5  # queueing, but with room: least loaded again
    assert make_policy(config).route([full, busy], "prompt", None).candidates[0] is full
    # Out of room in the request's region: spill to another region before queueing locally.
    full.kv_cache_usage, full.region, busy.region = 0.99, "us", "us"
    route = make_policy(config).route([full, busy, remote], "prompt", "us")
    assert [r.url for r in route.candidates] == ["http://busy", "http://remote", "http://full"]
    with pytest.raises(ValueError, match="kv_full_threshold"):
        RouterConfig(kv_full_threshold=0)


def test_router_checks_the_keys_file_and_forwards_the_key(fleet, router, tmp_path):
    a, = fleet("a")
    a.api_key = "sk-alice"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "alice", "key": "sk-alice", "requests_per_minute": 100}]}))
    rt = router([a], api_keys_file=str(keys))
    for headers in ({}, {"Authorization": "Bearer sk-mallory"}, {"Authorization": "sk-alice"}):
        r = rt.chat(HI, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert a.requests == []  # refused at the router: no replica spent anything on them
    ok = rt.chat(HI, headers={"Authorization": "Bearer sk-alice"})
    assert ok.status_code == 200 and a.requests[-1]["headers"]["authorization"] == "Bearer sk-alice"
    assert rt.client.get("/v1/models").status_code == 401
    assert rt.client.get("/replicas").status_code == 401
    assert rt.client.get("/replicas", headers={"Authorization": "Bearer sk-alice"}).json()["replicas"]
    assert rt.client.get("/health").status_code == 200 and rt.client.get("/metrics").status_code == 200
    assert rt.metrics()["tokenmill_router:refusals_total{reason=auth}"] == 5
    keys.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read API keys file"):
        router([a], api_keys_file=str(keys))
    assert httpx.get(f"{a.url}/health", trust_env=False).status_code == 200
