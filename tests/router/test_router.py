"""The fleet router: prefix index and policies on their own, then the proxy in front of small fake
replicas (conftest.py), and once in front of two real `tokenmill serve` replicas."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server, free_port, spawn
from tests.router.conftest import CHAT, Router, stop_all, wait_for
from tokenmill.router.cli import config_from_args
from tokenmill.router.config import RouterConfig
from tokenmill.router.policy import make_policy
from tokenmill.router.prefix_index import PrefixIndex
from tokenmill.router.prompt_text import ReplyCollector, answered_text, request_text
from tokenmill.router.replicas import Replica, parse_load, read_replicas_file


# --- prefix index, routing text, policies (no HTTP) ------------------------------------------

def test_prefix_index_matches_chains_and_evicts_leaves_first():
    idx = PrefixIndex(chunk_chars=4, max_chunks=6)
    idx.insert("aaaabbbbcccc", "r1")
    idx.insert("aaaabbbbdddd", "r2")
    assert idx.match("aaaabbbbcccc") == {"r1": 1.0, "r2": 8 / 12}
    assert idx.match("aaaabbbbccccXY") == {"r1": 12 / 14, "r2": 8 / 14}
    assert idx.match("zzzzaaaa") == {} and idx.match("") == {}
    assert idx.match("bbbb") == {}  # a chunk counts only at its place in the chain
    assert len(idx) == 4
    idx.insert("eeeeffffgggg", "r1")  # 7 chunks > 6: the least recently used leaf goes, not a root
    assert len(idx) == 6
    assert idx.match("aaaabbbbdddd") == {"r1": 8 / 12, "r2": 8 / 12}
    assert idx.match("aaaabbbbcccc") == {"r1": 1.0, "r2": 8 / 12}


def test_chat_routing_text_turn_k_extends_turn_k_minus_1():
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    t1 = request_text(CHAT, {"model": "demo", "messages": turns})
    reply = ReplyCollector(chat=True)
    for event in (b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n',
                  b'data: {"choices": [{"index": 0, "delta": {"content": "hel"}}]}\n\n',
                  b'data: {"choices": [{"index": 1, "delta": {"content": "other choice"}}]}\n\n',
                  b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}}]}\n\n', b"data: [DONE]\n\n"):
        reply.feed_event(event)
    assert reply.text == "hello" and reply.done
    after = answered_text(CHAT, {"messages": turns}, t1, reply.text)
    # The client sends the reply back with its keys in any order: canonical JSON makes it the same text.
    turn2 = turns + [{"content": "hello", "role": "assistant"}, {"role": "user", "content": "more"}]
    t2 = request_text(CHAT, {"messages": turn2, "model": "demo"})
    assert t2.startswith(after) and after.startswith(t1)
    assert not request_text(CHAT, {"model": "other", "messages": turns}).startswith(t1[:6])
    assert request_text("/v1/completions", {"model": "m", "prompt": "abc"}) == "m\nabc"
    assert answered_text("/v1/completions", {"prompt": [1, 2]}, "x", "y") is None


def _replicas(*loads: float, regions: Optional[list] = None, weights: Optional[list] = None) -> list[Replica]:
    out = []
    for i, load in enumerate(loads):
        r = Replica(f"http://r{i}", region=(regions or [None] * len(loads))[i],
                    weight=(weights or [1.0] * len(loads))[i], healthy=True)
        r.running = load
        out.append(r)
    return out


def test_policies_order_candidates():
    rr = make_policy(RouterConfig(policy="round-robin"))
    reps = _replicas(0, 0, 0)
    firsts = [rr.route(reps, "p", None).candidates[0].url for _ in range(6)]
    assert firsts == ["http://r0", "http://r1", "http://r2"] * 2
    ll = make_policy(RouterConfig(policy="least-load"))
    assert [r.url for r in ll.route(_replicas(5, 1, 3), "p", None).candidates] == ["http://r1", "http://r2", "http://r0"]
    # Weighted: 4 running on weight 4 is lighter than 2 on weight 1.
    assert ll.route(_replicas(4, 2, weights=[4, 1]), "p", None).candidates[0].url == "http://r0"
    reps = _replicas(0, 0, 0)
    reps[1].healthy = False
    assert "http://r1" not in [r.url for r in ll.route(reps, "p", None).candidates]
    # Regions: the request's first, by load; the others after, as spill.
    reps = _replicas(9, 0, 1, regions=["eu", "us", "eu"])
    assert [r.url for r in ll.route(reps, "p", "eu").candidates] == ["http://r2", "http://r0", "http://r1"]
    assert [r.url for r in ll.route(reps, "p", None).candidates][0] == "http://r1"


def test_cache_aware_follows_the_prefix_unless_imbalanced():
    ca = make_policy(RouterConfig(policy="cache-aware", chunk_chars=8))
    reps = _replicas(3, 0, 0)
    prompt = "a long shared system prompt " * 4
    ca.served(prompt, reps[0])
    route = ca.route(reps, prompt + "and a question", None)
    assert route.affinity and route.candidates[0] is reps[0]
    assert not ca.route(reps, "something else entirely, nothing cached", None).affinity
    reps[0].running = 40  # gap 40 > 32 and 40 > 1.5 x 0: imbalanced, so by load
    route = ca.route(reps, prompt, None)
    assert not route.affinity and route.candidates[0] is not reps[0]
    reps[1].running = reps[2].running = 30  # gap 10: balanced again
    assert ca.route(reps, prompt, None).candidates[0] is reps[0]
    ca.config.cache_threshold = 1.0  # a partial match below the threshold goes by load
    assert not ca.route(reps, prompt + "a different tail", None).affinity


def test_replica_specs_config_and_cli(tmp_path):
    r = Replica.parse("http://h:1/,region=eu,weight=2")
    assert (r.url, r.region, r.weight) == ("http://h:1", "eu", 2.0)
    for bad in ("h:1", "http://h:1,zone=x", "http://h:1,weight=0", "http://h:1,weight=x"):
        with pytest.raises(ValueError):
            Replica.parse(bad)
    for kw in ({"policy": "random"}, {"cache_threshold": 2}, {"balance_rel_threshold": 0.5},
               {"health_interval_s": 0}):
        with pytest.raises(ValueError):
            RouterConfig(**kw)
    f = tmp_path / "replicas.txt"
    f.write_text("# the fleet\nhttp://a:1,region=eu\n\nhttp://b:2  # spare\n")
    assert [x.url for x in read_replicas_file(str(f))] == ["http://a:1", "http://b:2"]
    from tokenmill.cli import build_parser  # here, not at collection: it imports torch

    args = build_parser().parse_args(["router", "--replica", "http://a:1", "--replicas-file", str(f),
                                      "--policy", "least-load", "--region", "eu", "--cache-threshold", "0.7",
                                      "--port", "9000"])
    cfg = config_from_args(args)
    assert (cfg.policy, cfg.region, cfg.cache_threshold, args.port) == ("least-load", "eu", 0.7, 9000)
    from tokenmill.router.replicas import ReplicaSet
    with pytest.raises(ValueError, match="listed twice"):
        ReplicaSet([Replica("http://a:1"), Replica("http://a:1/")])
    text = ('tokenmill:num_requests_running{model_name="a"} 2\ntokenmill:num_requests_running{model_name="b"} 1\n'
            'tokenmill:num_requests_waiting{model_name="a"} 4\ntokenmill:kv_cache_usage_perc{model_name="a"} 0.25\n')
    assert parse_load(text) == (3.0, 4.0, 0.25)


# --- the proxy in front of fake replicas -------------------------------------------------------

def conversation(router: Router, turns: int, tag: str) -> list[str]:
    """A multi-turn chat; each turn sends the whole history back. Returns who served each turn."""
    messages = [{"role": "system", "content": f"You are the {tag} assistant. " * 8}]
    served = []
    for k in range(turns):
        messages.append({"role": "user", "content": f"question {k} about {tag}"})
        r = router.chat(messages)
        served.append(router.replica_of(r))
        messages.append(r.json()["choices"][0]["message"])
    return served


def test_multi_turn_chat_sticks_to_its_replica(fleet, router):
    fakes = fleet("a", "b", "c")
    rt = router(fakes)
    first = conversation(rt, 4, "travel")
    assert len(set(first)) == 1, first
    second = conversation(rt, 4, "cooking")
    assert len(set(second)) == 1, second
    m = rt.metrics()
    assert sum(v for k, v in m.items() if k.startswith("tokenmill_router:cache_affinity_hits_total")) == 6


def test_balance_override_sends_to_least_loaded(fleet, router):
    fakes = fleet("a", "b")
    rt = router(fakes)
    messages = [{"role": "system", "content": "Shared long preamble. " * 10}, {"role": "user", "content": "q1"}]
    home = rt.replica_of(rt.chat(messages))
    assert rt.replica_of(rt.chat(messages)) == home
    busy = next(f for f in fakes if f.url == home)
    busy.running, busy.waiting = 60, 20
    wait_for(lambda: next(r for r in rt.fleet.replicas if r.url == home).load >= 80, what="the load poll")
    assert rt.replica_of(rt.chat(messages)) != home
    assert rt.metrics()[f"tokenmill_router:cache_affinity_hits_total{{replica={home}}}"] == 1


def test_round_robin_and_least_load_through_the_proxy(fleet, router):
    fakes = fleet("a", "b", "c")
    rt = router(fakes, policy="round-robin")
    urls = [rt.replica_of(rt.chat([{"role": "user", "content": "x"}])) for _ in range(6)]
    assert urls == [f.url for f in fakes] * 2
    fakes[0].running, fakes[1].running, fakes[2].running = 5, 1, 3
    ll = router(fakes, policy="least-load")
    assert {ll.replica_of(ll.chat([{"role": "user", "content": str(i)}])) for i in range(4)} == {fakes[1].url}


def test_dead_replica_is_retried_elsewhere_unnoticed(fleet, router):
    fakes = fleet("a", "b")
    rt = router(fakes, policy="round-robin", health_interval_s=60)  # the poller will not notice first
    fakes[0].server.stop()
    for i in range(4):
        assert rt.replica_of(rt.chat([{"role": "user", "content": str(i)}])) == fakes[1].url
    m = rt.metrics()
    assert m[f"tokenmill_router:retries_total{{reason=connect_error,replica={fakes[0].url}}}"] == 1
    assert m[f"tokenmill_router:replica_healthy{{region=,replica={fakes[0].url}}}"] == 0


def test_dead_replica_leaves_and_returns_within_2s(fleet, router):
    fakes = fleet("a", "b")
    rt = router(fakes, policy="round-robin")
    replica = rt.fleet.replicas[0]
    assert replica.healthy
    t0 = time.monotonic()
    fakes[0].server.stop()
    wait_for(lambda: not replica.healthy, 2.0, "the dead replica to be taken out")
    assert time.monotonic() - t0 < 2.0
    assert {rt.replica_of(rt.chat([{"role": "user", "content": str(i)}])) for i in range(3)} == {fakes[1].url}
    fakes[0].server.start()  # back on the same port
    wait_for(lambda: replica.healthy, 2.0, "the replica to come back")
    assert {rt.replica_of(rt.chat([{"role": "user", "content": str(i)}])) for i in range(4)} == \
        {fakes[0].url, fakes[1].url}
    fakes[1].mode = "down"  # its /health says 503: out as well
    wait_for(lambda: not rt.fleet.replicas[1].healthy, 2.0, "a 503 health check to take it out")
    assert rt.client.get("/health").status_code == 200
    fakes[0].mode = "down"
    wait_for(lambda: rt.client.get("/health").status_code == 503, 2.0, "router health to fail")
    r = rt.chat([{"role": "user", "content": "anyone?"}])
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"


def test_503_and_5xx_move_on_and_fleet_wide_503_has_retry_after(fleet, router):
    fakes = fleet("a", "b", "c")
    rt = router(fakes, policy="round-robin")
    fakes[0].mode, fakes[1].mode = "busy", "error"
    for i in range(3):
        assert rt.replica_of(rt.chat([{"role": "user", "content": str(i)}])) == fakes[2].url
    m = rt.metrics()
    assert m[f"tokenmill_router:retries_total{{reason=at_capacity,replica={fakes[0].url}}}"] >= 1
    assert m[f"tokenmill_router:retries_total{{reason=server_error,replica={fakes[1].url}}}"] >= 1
    fakes[1].mode = "ok"
    wait_for(lambda: rt.fleet.replicas[1].healthy, 2.0, "the 500ing replica to pass a check again")
    for f, wait in zip(fakes, (7, 3, 9)):
        f.mode, f.retry_after = "busy", wait
    r = rt.chat([{"role": "user", "content": "full?"}])
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    err = r.json()["error"]
    assert err["type"] == "service_unavailable" and err["code"] == "fleet_at_capacity" and "capacity" in err["message"]
    assert rt.metrics()["tokenmill_router:refusals_total{reason=at_capacity}"] == 1
    assert all(f.server and rt.fleet.replicas[i].healthy for i, f in enumerate(fakes))  # full is not down


def test_region_preference_and_spill(fleet, router):
    fakes = fleet("eu1", "us1", "us2")
    specs = [f"{fakes[0].url},region=eu", f"{fakes[1].url},region=us", f"{fakes[2].url},region=us"]
    rt = router(fakes, specs, policy="least-load", region="eu")
    assert {rt.replica_of(rt.chat([{"role": "user", "content": str(i)}])) for i in range(3)} == {fakes[0].url}
    us = {rt.replica_of(rt.chat([{"role": "user", "content": str(i)}], headers={"x-tokenmill-region": "us"}))
          for i in range(4)}
    assert us == {fakes[1].url, fakes[2].url}
    fakes[0].mode = "busy"  # the region has no room: spill
    assert rt.replica_of(rt.chat([{"role": "user", "content": "spill"}])) in (fakes[1].url, fakes[2].url)
    fakes[0].mode = "down"  # the region has no healthy replica: spill
    wait_for(lambda: not rt.fleet.replicas[0].healthy, 2.0, "eu1 to be taken out")
    assert rt.replica_of(rt.chat([{"role": "user", "content": "spill"}])) in (fakes[1].url, fakes[2].url)


def _events(response: httpx.Response) -> list[str]:
    return [e + "\n\n" for e in response.read().decode().split("\n\n") if e]


def test_streaming_passes_through_chunk_by_chunk(fleet, router):
    fakes = fleet("a")
    fakes[0].chunk_delay = 0.15
    rt = router(fakes)
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": "hi"}]}), ("/v1/completions", {"prompt": "hi"})):
        body = {"model": "demo", "stream": True, **body}
        t0 = time.monotonic()
        with rt.client.stream("POST", path, json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            first = next(lines)
            t_first = time.monotonic() - t0
            got = [first + "\n\n"] + [line + "\n\n" for line in lines if line]
        assert t_first < 0.15 < time.monotonic() - t0  # the first chunk came before the rest were made
        with httpx.stream("POST", fakes[0].url + path, json=body, trust_env=False) as direct:
            assert got == _events(direct) == fakes[0].events(path == CHAT)


def test_stream_failing_mid_way_ends_with_error_event(fleet, router):
    fakes = fleet("a")
    fakes[0].mode, fakes[0].fail_after = "fail", 2
    rt = router(fakes)
    body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with rt.client.stream("POST", CHAT, json=body, timeout=5) as r:
        events = _events(r)
    assert events[:2] == fakes[0].events(True)[:2]
    assert json.loads(events[2][len("data: "):])["error"]["code"] == "replica_failed"
    assert events[3:] == ["data: [DONE]\n\n"]
    assert rt.metrics()[f"tokenmill_router:stream_failures_total{{replica={fakes[0].url}}}"] == 1


def test_stream_failing_before_its_first_event_is_retried(fleet, router):
    fakes = fleet("a", "b")
    fakes[0].mode, fakes[0].fail_after = "fail", 0
    rt = router(fakes, policy="round-robin", health_interval_s=60)
    body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        with rt.client.stream("POST", CHAT, json=body) as r:
            assert r.headers["x-tokenmill-replica"] == fakes[1].url
            assert _events(r) == fakes[1].events(True)


def test_client_disconnect_reaches_the_replica(fleet, router):
    fakes = fleet("a")
    fakes[0].chunks, fakes[0].chunk_delay = 200, 0.05
    rt = router(fakes)
    body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": "long"}]}
    with rt.client.stream("POST", CHAT, json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
    wait_for(lambda: fakes[0].cancelled == 1, 3.0, "the replica to see the stream cancelled")
    wait_for(lambda: rt.fleet.replicas[0].in_flight == 0, 3.0, "the router to close its upstream")
    fakes[0].mode = "hang"  # a non-streamed request, given up by the client
    with pytest.raises(httpx.ReadTimeout):
        rt.client.post(CHAT, json={**body, "stream": False}, timeout=0.5)
    wait_for(lambda: fakes[0].cancelled == 2, 3.0, "the replica to see the request cancelled")
    wait_for(lambda: rt.fleet.replicas[0].in_flight == 0, 3.0, "the router to close its upstream")


def test_hung_replica_times_out_and_is_retried(fleet, router):
    fakes = fleet("a", "b")
    fakes[0].mode = "hang"
    rt = router(fakes, policy="round-robin", upstream_timeout_s=0.5)
    answered = {rt.replica_of(rt.chat([{"role": "user", "content": str(i)}])) for i in range(2)}
    assert answered == {fakes[1].url}
    assert rt.metrics()[f"tokenmill_router:retries_total{{reason=timeout,replica={fakes[0].url}}}"] == 1
    wait_for(lambda: fakes[0].cancelled == 1, 3.0, "the timed-out request to be closed")


def test_authorization_passes_through_and_refusals_are_not_retried(fleet, router):
    fakes = fleet("a", "b")
    for f in fakes:
        f.api_key = "sk-fleet"
    rt = router(fakes, policy="round-robin")
    ok = rt.chat([{"role": "user", "content": "hi"}], headers={"Authorization": "Bearer sk-fleet"})
    served = next(f for f in fakes if f.url == rt.replica_of(ok))
    assert served.requests[-1]["headers"]["authorization"] == "Bearer sk-fleet"
    seen = sum(len(f.requests) for f in fakes)
    bad = rt.chat([{"role": "user", "content": "hi"}], headers={"Authorization": "Bearer sk-wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    assert sum(len(f.requests) for f in fakes) == seen + 1  # one replica asked, no other tried
    assert rt.client.get("/v1/models", headers={"Authorization": "Bearer sk-fleet"}).json()["data"][0]["id"] == "demo"
    assert rt.client.get("/v1/models").status_code == 401
    r = rt.client.post(CHAT, content=b"not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert rt.client.get("/nope").json()["error"]["type"] == "not_found_error"


def test_router_metrics_parse(fleet, router):
    fakes = fleet("a", "b")
    fakes[0].running = 2
    rt = router(fakes, policy="round-robin")
    for i in range(4):
        rt.chat([{"role": "user", "content": str(i)}])
    families = {f.name: f for f in text_string_to_metric_families(rt.client.get("/metrics").text)}
    for name in ("requests", "cache_affinity_hits", "retries", "stream_failures", "refusals"):
        assert families[f"tokenmill_router:{name}"].type == "counter"
    for name in ("replica_healthy", "replica_load", "replica_in_flight"):
        assert families[f"tokenmill_router:{name}"].type == "gauge"
    m = rt.metrics()
    assert [m[f"tokenmill_router:requests_total{{replica={f.url}}}"] for f in fakes] == [2, 2]
    assert m[f"tokenmill_router:replica_load{{region=,replica={fakes[0].url}}}"] == 2
    table = rt.client.get("/replicas").json()
    assert [r["healthy"] for r in table["replicas"]] == [True, True] and table["policy"] == "round-robin"


def test_router_command_line_serves(fleet, tmp_path):
    import subprocess
    import sys

    fakes = fleet("a", "b")
    (tmp_path / "fleet.txt").write_text(f"{fakes[1].url},region=us\n")
    port = free_port()
    proc = spawn([sys.executable, "-m", "tokenmill.cli", "router", "--replica", fakes[0].url,
                  "--replicas-file", str(tmp_path / "fleet.txt"), "--policy", "round-robin",
                  "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health", trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "tokenmill router to start")
        served = {httpx.post(f"{url}{CHAT}", json={"model": "demo", "messages": [{"role": "user", "content": "x"}]},
                             trust_env=False).headers["x-tokenmill-replica"] for _ in range(2)}
        assert served == {fakes[0].url, fakes[1].url}
    finally:
        proc.terminate()
        proc.wait(10)


# --- two real replicas -------------------------------------------------------------------------

E2E_TEST = "test_real_replicas_stream_and_second_turn_hits_the_same_cache"


class RealFleet:
    """Two `tokenmill serve` replicas, booted in the background from the module's start so that
    their ~10 s of loading overlaps the fake-replica tests (which mostly wait on sockets)."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.errors: list[BaseException] = []
        # aten linears: the kernel auto-timing at startup is not what these tests are about.
        self.threads = [threading.Thread(target=self._boot, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()

    def _boot(self) -> None:
        try:
            self.servers.append(Server("--grpc-port", "0", "--linear-backend", "aten"))
        except BaseException as e:  # noqa: BLE001 - reported by wait(), in the test's thread
            self.errors.append(e)

    def wait(self) -> list[Server]:
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors
        return self.servers

    def stop(self) -> None:
        for t in self.threads:
            t.join()
        stop_all(self.servers)


@pytest.fixture(scope="module", autouse=True)
def real_fleet(request) -> Iterator[Optional[RealFleet]]:
    wanted = any(item.name == E2E_TEST for item in request.session.items)
    booting = RealFleet() if wanted else None
    yield booting
    if booting is not None:
        booting.stop()


def test_real_replicas_stream_and_second_turn_hits_the_same_cache(real_fleet, router):
    servers = real_fleet.wait()
    # A generous health timeout: a replica's event loop shares 2 cores with its engine here.
    rt = router([], [s.url for s in servers], health_timeout_s=5.0)
    user1 = ("Tell me about the Python interpreter, how it reads a program, compiles it to bytecode "
             "and runs it one instruction at a time, and what the global interpreter lock is for.")
    messages = [{"role": "user", "content": user1}]
    body = {"model": "demo", "temperature": 0, "max_tokens": 12}
    with rt.client.stream("POST", CHAT, json={**body, "messages": messages, "stream": True}) as r:
        assert r.status_code == 200
        home = r.headers["x-tokenmill-replica"]
        deltas = [json.loads(line[6:])["choices"] for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c[0]["delta"].get("content") or "" for c in deltas if c)
    same = next(s for s in servers if s.url == home)
    other = next(s for s in servers if s.url != home)
    # The direct greedy reply, from the other replica (so the router's pick holds turn 1 alone).
    direct = httpx.post(f"{other.url}{CHAT}", json={**body, "messages": messages}, timeout=60, trust_env=False)
    reply = direct.json()["choices"][0]["message"]["content"]
    assert reply and streamed == reply
    before = {s.url: s.metrics()["tokenmill:prefix_cache_hits_total"] for s in servers}
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And after that?"}]
    r2 = rt.chat(messages, **body)
    assert rt.replica_of(r2) == home
    after = {s.url: s.metrics()["tokenmill:prefix_cache_hits_total"] for s in servers}
    assert after[same.url] > before[same.url] and after[other.url] == before[other.url]
    assert rt.metrics()[f"tokenmill_router:cache_affinity_hits_total{{replica={home}}}"] == 1
    # A client that leaves mid-stream: the router closes its request, the replica aborts it and
    # its KV blocks go back to the pool.
    long = {"model": "demo", "max_tokens": 600, "ignore_eos": True, "stream": True, "messages": messages}
    with rt.client.stream("POST", CHAT, json=long) as r:
        serving = next(s for s in servers if s.url == r.headers["x-tokenmill-replica"])
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        assert serving.metrics()["tokenmill:num_requests_running"] == 1
    wait_for(lambda: serving.metrics()["tokenmill:num_requests_running"] == 0
             and serving.metrics()["tokenmill:kv_cache_usage_perc"] == 0.0, 10.0, "the replica to free the request's KV")
