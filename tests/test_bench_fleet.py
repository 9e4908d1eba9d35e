"""`tokenmill bench fleet`'s workload and arithmetic, with no server: conversations, the client
loop's interleaving, the per-policy summary, the hit rate from Prometheus text, the failover
verdicts."""
from __future__ import annotations

import asyncio
import random

import pytest

from tokenmill.bench.fleet_report import verdicts
from tokenmill.bench.fleet_workload import (Conversation, Failover, TurnResult, conversation_spread, hit_rate,
                                            make_conversations, play, prefix_counters, summarize_policy)

WORDS = [f"w{i}" for i in range(500)]


def test_turn_k_extends_turn_k_minus_1_exactly():
    convs = make_conversations(3, 4, words_per_turn=20, system_words=5, seed=1, words=WORDS)
    assert [len(c.users) for c in convs] == [4, 4, 4]
    assert len({c.system for c in convs}) == 1  # one shared system prompt
    replies = ["r0", "r1", "r2"]
    for c in convs:
        for k in range(1, 4):
            prev, cur = c.messages(k - 1, replies), c.messages(k, replies)
            assert cur[:len(prev)] == prev  # the whole previous request, unchanged ...
            assert cur[len(prev):] == [{"role": "assistant", "content": replies[k - 1]},
                                       {"role": "user", "content": c.users[k]}]  # ... then its reply and a new turn
        assert c.messages(0, [])[0] == {"role": "system", "content": c.system}
    # Conversations share nothing past the system prompt; each turn's text is new.
    firsts = [c.users[0] for c in convs]
    assert len({u.split("] ", 1)[0] for u in firsts}) == 3
    assert all(len(u.split("] ", 1)[1].split()) == 20 for c in convs for u in c.users)
    assert make_conversations(3, 4, 20, 5, seed=1, words=WORDS)[2].users == convs[2].users  # seeded
    thinking = make_conversations(3, 4, 20, 5, seed=1, words=WORDS, think_s=2.0)
    assert [c.users for c in thinking] == [c.users for c in convs]  # the same text with or without pauses
    assert all(c.think[0] == 0 and all(1.0 <= t <= 3.0 for t in c.think[1:]) for c in thinking)
    assert len({t for c in thinking for t in c.think[1:]}) == 9 and all(c.think == [0.0] * 4 for c in convs)
    with pytest.raises(ValueError):
        convs[0].messages(2, ["only one reply"])


def _fake_send(log: list[tuple[int, int]], fail: set[tuple[int, int, int]] = frozenset()):
    in_flight = [0, 0]  # now, most

    async def send(conv: Conversation, turn: int, messages, t0: float) -> TurnResult:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        attempt = sum(1 for c, k in log if (c, k) == (conv.cid, turn))
        log.append((conv.cid, turn))
        assert len(messages) == 2 + 2 * turn
        await asyncio.sleep(0.01 + 0.002 * ((conv.cid * 7 + turn) % 3))
        in_flight[0] -= 1
        ok = (conv.cid, turn, attempt) not in fail
        return TurnResult(start=0.0, ok=ok, ttft=0.001, e2e=0.01, output_tokens=4, reply=f"reply {conv.cid}.{turn}",
                          error="" if ok else "boom", replica="http://a")

    return send, in_flight


def test_play_interleaves_conversations_in_turn_order_under_the_cap():
    convs = make_conversations(5, 3, 10, 3, seed=0, words=WORDS)
    log: list[tuple[int, int]] = []
    send, in_flight = _fake_send(log)
    results, duration = asyncio.run(play(convs, send, concurrency=2, stagger_s=0.001))
    assert len(results) == 15 and duration > 0 and in_flight[1] == 2
    for c in range(5):  # each conversation's turns in order, each after the previous reply
        assert [k for cc, k in log if cc == c] == [0, 1, 2]
    # Interleaved: between two turns of any conversation, other conversations' turns are sent
    # (the FIFO cap hands the slot to those waiting), so no conversation runs alone.
    for c in range(5):
        at = [i for i, (cc, _) in enumerate(log) if cc == c]
        assert all(b - a > 1 for a, b in zip(at, at[1:])), (c, log)
    assert log != sorted(log)  # not one conversation after another


def test_play_waits_each_users_think_time():
    convs = make_conversations(2, 3, 10, 3, seed=0, words=WORDS)
    for c in convs:
        c.think = [0.0, 0.05, 0.05]
    log: list[tuple[int, int]] = []
    send, _ = _fake_send(log)
    _, duration = asyncio.run(play(convs, send, concurrency=2, stagger_s=0.0))
    assert duration >= 0.10 + 3 * 0.01  # two pauses and three requests, one after another, per conversation


def test_a_failed_turn_is_retried_once_then_the_conversation_stops():
    convs = make_conversations(2, 3, 10, 3, seed=0, words=WORDS)
    log: list[tuple[int, int]] = []
    send, _ = _fake_send(log, fail={(0, 1, 0), (1, 1, 0), (1, 1, 1)})
    results, _ = asyncio.run(play(convs, send, concurrency=4, stagger_s=0.0))
    assert [k for c, k in log if c == 0] == [0, 1, 1, 2]  # retried, then went on
    assert [k for c, k in log if c == 1] == [0, 1, 1]  # failed twice: stopped
    assert sorted((r.conversation, r.turn, r.attempt, r.ok) for r in results if not r.ok) == [
        (0, 1, 0, False), (1, 1, 0, False), (1, 1, 1, False)]


def _result(conv: int, turn: int, ttft: float, ok: bool = True, replica: str = "http://a", start: float = 0.0,
            e2e: float = 1.0) -> TurnResult:
    return TurnResult(start=start, ok=ok, ttft=ttft, e2e=e2e, output_tokens=10 if ok else 0, prompt_tokens=100,
                      conversation=conv, turn=turn, replica=replica, error="" if ok else "x")


def test_summary_median_p99_throughput_and_per_turn():
    rng = random.Random(0)
    ttfts = [0.1 * (i + 1) for i in range(100)]  # 0.1 .. 10.0 s
    rng.shuffle(ttfts)
    results = [_result(i % 10, i // 10, t) for i, t in enumerate(ttfts)] + [_result(0, 0, 0.0, ok=False)]
    s = summarize_policy(results, duration=20.0, concurrency=4, num_turns=10)
    assert s["requests"] == 101 and s["completed"] == 100 and s["failed"] == 1
    assert s["median_ttft_ms"] == pytest.approx(5050.0)
    assert s["p99_ttft_ms"] == pytest.approx(9901.0)  # numpy's linear interpolation: 9.9 + 0.01 * 0.1 s
    assert s["output_tok_s"] == pytest.approx(100 * 10 / 20.0)  # failed requests' tokens do not count
    by_turn = [1000 * sorted(t for i, t in enumerate(ttfts) if i // 10 == k)[4:6][0] for k in range(10)]
    assert all(m > 0 for m in s["median_ttft_ms_per_turn"]) and len(s["median_ttft_ms_per_turn"]) == 10
    assert s["median_ttft_ms_per_turn"][0] >= by_turn[0]  # a median of 10: between the 5th and 6th
    assert s["replicas_used"] == {"http://a": 101}
    spread = conversation_spread([_result(0, 0, 1), _result(0, 1, 1, replica="http://b"), _result(1, 0, 1)])
    assert spread == {0: ["http://a", "http://b"], 1: ["http://a"]}


METRICS = """\
# HELP tokenmill:prefix_cache_queries_total Tokens looked up in the prefix cache.
# TYPE tokenmill:prefix_cache_queries_total counter
tokenmill:prefix_cache_queries_total{model_name="fleet"} 1200.0
tokenmill:prefix_cache_queries_total{model_name="other"} 300.0
# HELP tokenmill:prefix_cache_queries_created Tokens looked up in the prefix cache.
# TYPE tokenmill:prefix_cache_queries_created gauge
tokenmill:prefix_cache_queries_created{model_name="fleet"} 1.7e9
# HELP tokenmill:prefix_cache_hits_total Tokens found in the prefix cache.
# TYPE tokenmill:prefix_cache_hits_total counter
tokenmill:prefix_cache_hits_total{model_name="fleet"} 960.0
tokenmill:prefix_cache_hits_total{model_name="other"} 0.0
# HELP tokenmill:num_requests_running Requests in the running batch.
# TYPE tokenmill:num_requests_running gauge
tokenmill:num_requests_running{model_name="fleet"} 3.0
"""


def test_hit_rate_from_prometheus_deltas():
    assert prefix_counters(METRICS) == (1500.0, 960.0)  # summed over models; _created ignored
    assert prefix_counters("") == (0.0, 0.0)
    before = [(1500.0, 960.0), (0.0, 0.0), (100.0, 50.0)]
    after = [(2500.0, 1860.0), (1000.0, 800.0), (100.0, 50.0)]
    h = hit_rate(before, after)
    assert h == {"queried_tokens": 2000.0, "hit_tokens": 1700.0, "hit_rate": 0.85}
    assert hit_rate([(0, 0)], [(0, 0)])["hit_rate"] == 0.0
    with pytest.raises(ValueError):
        hit_rate(before, after[:2])


def test_failover_verdicts():
    victim, other = "http://v", "http://o"
    results = [_result(0, 0, 0.1, replica=victim, start=0.0, e2e=0.5),
               _result(0, 1, 0.1, ok=False, replica=victim, start=0.9, e2e=0.2),  # streaming when killed: allowed
               _result(0, 1, 0.1, replica=other, start=1.2, e2e=0.5),  # the retry, elsewhere
               _result(1, 0, 0.1, replica=other, start=0.0, e2e=0.5),
               _result(1, 1, 0.1, ok=False, replica=other, start=1.5, e2e=0.1)]  # a failure the goal forbids
    results[2].attempt = 1
    fo = Failover(victim, kill_at=1.0, attempts_at=[0.2, 0.9, 1.05], unhealthy_at=1.05)
    j = fo.judge(results, num_turns=2)
    assert j["failed_streaming_on_victim"] == 1 and j["failed_other"] == 1
    assert j["last_attempt_after_kill_s"] == pytest.approx(0.05) and j["marked_down_after_s"] == pytest.approx(0.05)
    assert j["victim_conversations_open"] == 1 and j["victim_conversations_continued"] == 1
    assert j["victim_conversations_finished"] == 1
    base = {"median_ttft_ms": 1, "p99_ttft_ms": 100.0, "hit_rate": 0.9}
    result = {"goals": {"p99_ratio": 2.0, "hit_rate": 0.8, "stop_sending_s": 2.0},
              "policies": {"round-robin": {**base, "p99_ttft_ms": 199.0}, "cache-aware": base},
              "failover": {"failover": j}}
    v = verdicts(result)
    assert v["p99_ratio"] == (pytest.approx(1.99), False) and v["hit_rate"] == (0.9, True)
    assert v["no_other_failures"] == (1, False) and v["stops_sending"][1] is True
    assert v["conversations_continue"] == ("1/1", True)
