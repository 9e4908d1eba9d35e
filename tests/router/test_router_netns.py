"""The fleet router in front of replicas on separate hosts: each fake replica (netns_replica.py)
runs in its own network namespace, reached from the root namespace over a veth pair on its own
subnet, so a test can cut or black-hole one replica's network while the rest of the fleet stays up.

Needs root and iproute2 (`ip netns`, veth); skips, saying what failed, where namespaces cannot be
made. Traffic stays on loopback (the router) and these namespaces (the replicas).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.router.conftest import UvicornThread, wait_for
from tokenmill.router.config import RouterConfig
from tokenmill.router.proxy import build_app
from tokenmill.router.replicas import Replica

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
REPLICA_PORT = 8000
N_HOSTS = 3
PID = os.getpid()
# How fast the fleet must notice a replica leaving and coming back.
EJECT_WITHIN_S = READMIT_WITHIN_S = 2.0
ROUTER_CONFIG = dict(policy="cache-aware", health_interval_s=0.5, health_timeout_s=1.0, connect_timeout_s=1.0)


def _ip_binary() -> Optional[str]:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


IP = _ip_binary()


class NetnsError(Exception):
    """An `ip` command that failed; the message is its stderr."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert IP is not None
    r = subprocess.run([IP, *args], capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r


# --- the hosts: a namespace, a veth pair and a replica process each -----------------------------

@dataclass
class Host:
    name: str  # r1, r2, ...: what the replica calls itself in its replies
    netns: str
    veth_root: str  # the root namespace's end of the pair
    veth_ns: str  # the replica's end, inside netns
    root_ip: str
    ip: str
    log: Path
    proc: Optional[subprocess.Popen] = None
    made: list[str] = field(default_factory=list)  # what exists, for teardown: "netns", "veth"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{REPLICA_PORT}"

    # The ways one host drops off the network, each with its undo.
    def cut(self, how: str) -> None:
        if how == "link-down":  # the router's end: its route goes (new connects fail, pooled ones go silent)
            ip("link", "set", self.veth_root, "down")
        elif how == "black-hole":  # the replica's replies to the router vanish: connects and reads time out
            ip("-n", self.netns, "route", "add", "blackhole", f"{self.root_ip}/32")
        else:
            raise ValueError(how)

    def restore(self, how: str) -> None:
        if how == "link-down":
            ip("link", "set", self.veth_root, "up")
        elif how == "black-hole":
            ip("-n", self.netns, "route", "del", "blackhole", f"{self.root_ip}/32")
        else:
            raise ValueError(how)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=0.5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False


def _free_subnets(n: int) -> list[int]:
    """n third octets N with no 10.213.N.x address or route on this host."""
    used = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "addr", "show").stdout
    start = PID % 200
    free = [k for k in (1 + (start + i) % 250 for i in range(250)) if f"10.213.{k}." not in used]
    if len(free) < n:
        raise NetnsError("no free 10.213.N.0/24 subnets")
    return free[:n]


def _plumb(host: Host) -> None:
    ip("netns", "add", host.netns)
    host.made.append("netns")
    ip("link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_ns, "netns", host.netns)
    host.made.append("veth")
    ip("addr", "add", f"{host.root_ip}/24", "dev", host.veth_root)
    ip("link", "set", host.veth_root, "up")
    ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.veth_ns)
    ip("-n", host.netns, "link", "set", host.veth_ns, "up")
    ip("-n", host.netns, "link", "set", "lo", "up")
    ip("netns", "exec", host.netns, "true")  # exec works too (it remounts /sys: may be refused)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the test process dies without its teardown
    (`ip netns exec` execs the replica, so the setting reaches it)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _teardown(hosts: list[Host]) -> None:
    for h in hosts:  # the replicas first: TERM together, then wait (KILL what lingers)
        if h.proc is not None and h.proc.poll() is None:
            h.proc.terminate()
    for h in hosts:
        if h.proc is not None:
            try:
                h.proc.wait(5)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait(5)
    for h in hosts:
        # Deleting the root end takes its peer with it at once; deleting the namespace alone
        # frees the pair only when the kernel gets round to destroying it.
        if "veth" in h.made:
            ip("link", "del", h.veth_root, check=False)
        if "netns" in h.made:
            ip("netns", "del", h.netns, check=False)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator[list[Host]]:
    made: list[Host] = []
    try:
        if IP is None:
            pytest.skip("cannot create network namespaces: iproute2's `ip` is not on PATH nor in /usr/sbin")
        logs = tmp_path_factory.mktemp("netns")
        try:
            for i, octet in enumerate(_free_subnets(N_HOSTS), start=1):
                host = Host(name=f"r{i}", netns=f"tokenmill-test-{PID}-{i}", veth_root=f"tmr{PID}r{i}",
                            veth_ns=f"tmr{PID}i{i}", root_ip=f"10.213.{octet}.1", ip=f"10.213.{octet}.2",
                            log=logs / f"r{i}.log")
                made.append(host)
                _plumb(host)
        except (NetnsError, OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot create network namespaces: {e}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for h in made:
            with open(h.log, "wb") as log:
                h.proc = subprocess.Popen(
                    [IP, "netns", "exec", h.netns, sys.executable, "-m", "tests.router.netns_replica", "--host", h.ip,
                     "--port", str(REPLICA_PORT), "--name", h.name],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent)
        for h in made:
            def up(h: Host = h) -> bool:
                assert h.proc is not None
                if h.proc.poll() is not None:
                    raise AssertionError(f"replica {h.name} exited {h.proc.returncode}: {h.log.read_text()}")
                return h.answers()
            wait_for(up, 30, f"replica {h.name} at {h.url} to answer /health")
        yield made
    finally:
        _teardown(made)


# --- the router and conversations ---------------------------------------------------------------

@dataclass
class Router:
    app: FastAPI
    server: UvicornThread
    client: httpx.Client

    def replica(self, url: str) -> Replica:
        return next(r for r in self.app.state.fleet.replicas if r.url == url)

    def chat(self, messages: list[dict[str, str]], **kw: Any) -> httpx.Response:
        return self.client.post(CHAT, json={"model": "demo", "messages": messages}, **kw)


@pytest.fixture
def router(hosts) -> Iterator[Router]:
    app = build_app(RouterConfig(**ROUTER_CONFIG), [Replica(h.url) for h in hosts])
    server = UvicornThread(app, lifespan="on").start()  # the lifespan checks every replica before it serves
    rt = Router(app, server, httpx.Client(base_url=server.url, timeout=10, trust_env=False))
    try:
        assert [r.healthy for r in app.state.fleet.replicas] == [True] * len(hosts), \
            [r.describe() for r in app.state.fleet.replicas]
        yield rt
    finally:
        rt.client.close()
        server.stop()


class Conversation:
    """A chat client's conversation: each turn sends the earlier messages, the replies as the
    assistant's, and one new user message."""

    def __init__(self, topic: str) -> None:
        opening = (f"{topic}: tell me how a fleet router keeps each conversation on the replica that "
                   "already holds its prefix in KV cache, what happens when that replica's network "
                   "goes away, and how quickly the rest of the fleet takes over its conversations.")
        self.messages = [{"role": "user", "content": opening}]
        self.replicas: list[str] = []  # x-tokenmill-replica of each turn

    def turn(self, rt: Router, **kw: Any) -> str:
        r = rt.chat(self.messages, **kw)
        assert r.status_code == 200, r.text
        served_by = r.headers["x-tokenmill-replica"]
        reply = r.json()["choices"][0]["message"]["content"]
        assert reply.startswith("reply from r"), reply
        self.replicas.append(served_by)
        self.messages += [{"role": "assistant", "content": reply},
                          {"role": "user", "content": f"And then? ({len(self.replicas)})"}]
        return served_by

    @property
    def home(self) -> str:
        return self.replicas[-1]


def name_of(hosts: list[Host], url: str) -> str:
    return next(h.name for h in hosts if h.url == url)


def start_conversations(rt: Router, hosts: list[Host], topics: list[str]) -> list[Conversation]:
    """One conversation per topic, its first turn each: an idle fleet takes new conversations in
    turn, so N_HOSTS of them (or more) cover every replica."""
    convs = [Conversation(t) for t in topics]
    for c in convs:
        c.turn(rt)
    return convs


def cut_just_after_a_check(host: Host, replica: Replica, how: str) -> float:
    """Cut `host` just after the router's health check of it has passed: the longest it can go
    unnoticed (a whole interval, then a timeout). Returns when (time.monotonic()) it was cut."""
    seen = replica.checked_at
    wait_for(lambda: replica.checked_at != seen, 3.0, f"a health check of {host.name}")
    time.sleep(0.03)  # the check itself is a few ms: /health and /metrics over a veth
    t0 = time.monotonic()
    host.cut(how)
    return t0


# --- the tests ----------------------------------------------------------------------------------

def test_conversations_stick_to_their_replica(hosts, router):
    convs = start_conversations(router, hosts, [f"conversation {i}" for i in range(2 * N_HOSTS)])
    assert {c.home for c in convs} == {h.url for h in hosts}  # spread over the whole fleet
    for _ in range(3):  # interleaved, as concurrent clients would be
        for c in convs:
            c.turn(router)
    for c in convs:
        assert c.replicas == [c.replicas[0]] * 4, c.replicas
    # The replica that answered is the one the header names (each reply names its replica).
    for c in convs:
        assert all(m["content"].startswith(f"reply from {name_of(hosts, c.home)} ")
                   for m in c.messages if m["role"] == "assistant")
    hits = sum(v for k, v in _metrics(router).items() if k.startswith("tokenmill_router:cache_affinity_hits_total"))
    assert hits == 3 * len(convs)  # every turn after the first followed the cache


OUTAGES = ["link-down", "black-hole"]


@pytest.mark.parametrize("how", OUTAGES)
def test_cut_replica_is_ejected_its_conversations_move_and_it_returns(hosts, router, how):
    convs = start_conversations(router, hosts, [f"{how} conversation {i}" for i in range(N_HOSTS)])
    for c in convs:
        c.turn(router)  # a second turn each, so the router holds pooled connections to every replica
    a = convs[0]
    lost = next(h for h in hosts if h.url == a.home)
    others = [c for c in convs if c.home != lost.url]
    assert others, [c.replicas for c in convs]
    replica = router.replica(lost.url)
    assert replica.healthy

    t0 = cut_just_after_a_check(lost, replica, how)
    try:
        wait_for(lambda: not replica.healthy, EJECT_WITHIN_S + 1.0, f"{lost.name} to be ejected after {how}")
        ejected_s = time.monotonic() - t0
        _report(f"{how}: {lost.name} ejected after {ejected_s:.2f} s ({replica.last_error})")
        assert ejected_s < EJECT_WITHIN_S, f"{lost.name} ejected only after {ejected_s:.2f} s ({replica.last_error})"
        assert not lost.answers()  # the link really is gone

        # A's next turn goes elsewhere (answered, not refused), and the turn after stays there.
        moved_to = a.turn(router)
        assert moved_to != lost.url
        assert a.turn(router) == moved_to
        for c in others:  # the conversations on the healthy replicas do not notice
            assert c.turn(router) == c.home == c.replicas[0]
    finally:
        t1 = time.monotonic()
        lost.restore(how)

    wait_for(lambda: replica.healthy, READMIT_WITHIN_S + 1.0, f"{lost.name} to be readmitted after {how}")
    readmitted_s = time.monotonic() - t1
    _report(f"{how}: {lost.name} readmitted after {readmitted_s:.2f} s")
    assert readmitted_s < READMIT_WITHIN_S, f"{lost.name} readmitted only after {readmitted_s:.2f} s"
    assert lost.answers()

    # New conversations land on it again; A stays where its newest turns are cached.
    fresh = start_conversations(router, hosts, [f"{how} after the outage {i}" for i in range(N_HOSTS)])
    assert lost.url in {c.home for c in fresh}
    assert a.turn(router) == moved_to
    for c in fresh:
        assert c.turn(router) == c.home
    assert all(r.healthy for r in router.app.state.fleet.replicas)


def test_turn_sent_just_after_black_hole_moves_on_when_the_check_fails(hosts, router):
    """A request already on its way to a replica that goes silent is not left waiting for the
    upstream timeout (600 s by default): once a health check fails it is tried elsewhere."""
    convs = start_conversations(router, hosts, [f"in flight {i}" for i in range(N_HOSTS)])
    a = convs[0]
    lost = next(h for h in hosts if h.url == a.home)
    replica = router.replica(lost.url)
    lost.cut("black-hole")
    try:
        # Sent before the health check can notice (it needs health_timeout_s = 1 s of silence):
        # the router picks the lost replica and writes the request on turn 1's pooled connection,
        # where connect_timeout_s does not apply.
        t0 = time.monotonic()
        try:
            served_by: Optional[str] = a.turn(router, timeout=EJECT_WITHIN_S + 2.0)
        except httpx.TimeoutException:
            served_by = None
        waited = time.monotonic() - t0
        _report(f"turn sent just after the black-hole: answered by {served_by} after {waited:.2f} s "
                f"({lost.name} ejected: {not replica.healthy}, {replica.last_error})")
        assert served_by is not None, f"no answer in {waited:.2f} s: the request waited on the silent replica"
        assert served_by != lost.url and waited < EJECT_WITHIN_S + 0.5
        retries = {k: v for k, v in _metrics(router).items()
                   if k.startswith("tokenmill_router:retries_total") and f"replica={lost.url}" in k and v}
        assert sum(retries.values()) == 1, retries  # it was tried on the lost replica first
        _report(f"retries counted: {retries}")
        assert a.turn(router) == served_by  # and stays where it went
    finally:
        lost.restore("black-hole")
    wait_for(lambda: replica.healthy, READMIT_WITHIN_S + 1.0, f"{lost.name} to be readmitted")


def test_second_silent_replica_is_ejected_within_2s(hosts, router):
    first, second = hosts[1], hosts[0]
    r_first, r_second = router.replica(first.url), router.replica(second.url)
    first.cut("black-hole")
    try:
        wait_for(lambda: not r_first.healthy, EJECT_WITHIN_S + 1.0, f"{first.name} to be ejected")
        t0 = cut_just_after_a_check(second, r_second, "black-hole")
        try:
            wait_for(lambda: not r_second.healthy, EJECT_WITHIN_S + 1.0, f"{second.name} to be ejected")
            ejected_s = time.monotonic() - t0
            _report(f"black-hole with {first.name} already silent: {second.name} ejected after {ejected_s:.2f} s")
        finally:
            second.restore("black-hole")
    finally:
        first.restore("black-hole")
    wait_for(lambda: r_first.healthy and r_second.healthy, READMIT_WITHIN_S + 1.0, "both to be readmitted")
    assert ejected_s < EJECT_WITHIN_S, f"{second.name} ejected only after {ejected_s:.2f} s"


# --- helpers ------------------------------------------------------------------------------------

def _metrics(rt: Router) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(rt.client.get("/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _report(line: str) -> None:
    """Measured times, shown with `pytest -s` (and in a failing test's captured output)."""
    print(f"[netns] {line}", file=sys.stderr)
