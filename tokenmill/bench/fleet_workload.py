"""The workload of `tokenmill bench fleet`, with no server in it: multi-turn conversations, the
client loop that plays them interleaved, and the arithmetic on what comes back (TTFT summary per
policy, prefix-cache hit rate from the replicas' Prometheus text).

Each conversation is a shared system prompt, then turns of fresh user text; turn k's messages are
turn k-1's plus the reply it got (as an assistant message) plus the new user text, which is what
chat clients send, so a replica that served turn k-1 holds all but the newest part in its cache.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

from tokenmill.bench.serve import RequestResult
from tokenmill.bench.serve_report import summarize

TEXT = Path(__file__).resolve().parents[2] / "data" / "demo_heldout.txt"
# The replicas' prefix-cache counters (server/metrics.py); both count prompt TOKENS (hits are
# whole cached KV blocks times the block size), summed here over the models a replica serves.
QUERIES, HITS = "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total"

Message = dict[str, str]


@dataclass
class Conversation:
    cid: int
    system: str
    users: list[str]  # the user text of each turn
    # Seconds the user takes before each turn once the last reply is in (0 before the first).
    think: list[float] = field(default_factory=list)

    def messages(self, turn: int, replies: list[str]) -> list[Message]:
        """The request body's messages for `turn` (0-based), given the replies to turns 0..turn-1."""
        if len(replies) < turn:
            raise ValueError(f"turn {turn} needs {turn} replies; got {len(replies)}")
        out = [{"role": "system", "content": self.system}]
        for k in range(turn):
            out += [{"role": "user", "content": self.users[k]}, {"role": "assistant", "content": replies[k]}]
        return out + [{"role": "user", "content": self.users[turn]}]


def make_conversations(num_conversations: int, num_turns: int, words_per_turn: int, system_words: int,
                       seed: int, words: Optional[list[str]] = None, think_s: float = 0.0) -> list[Conversation]:
    """Conversations of random slices of the held-out text (real words, so the tokenizer sees
    ordinary English). Every user turn starts with its conversation and turn number, so two
    conversations share nothing beyond the system prompt (as two users would). Users think
    0.5-1.5x `think_s` (uniform, seeded) before each turn after the first."""
    words = words if words is not None else TEXT.read_text(encoding="utf-8").split()
    need = max(words_per_turn, system_words)
    if len(words) <= need:
        raise ValueError(f"the text has {len(words)} words; a turn needs {need}")
    rng = random.Random(seed)

    def piece(n: int) -> str:
        start = rng.randrange(0, len(words) - n)
        return " ".join(words[start:start + n])

    system = "You are a helpful assistant. " + piece(system_words)
    convs = [Conversation(c, system, [f"[conversation {c}, turn {k + 1}] {piece(words_per_turn)}"
                                      for k in range(num_turns)]) for c in range(num_conversations)]
    for conv in convs:  # drawn after the text, so a think time leaves the text as it was
        conv.think = [0.0] + [think_s * rng.uniform(0.5, 1.5) for _ in range(num_turns - 1)]
    return convs


@dataclass
class TurnResult(RequestResult):
    """One request of the workload (serve.RequestResult's timings, so serve_report sums them)."""

    conversation: int = 0
    turn: int = 0  # 0-based
    attempt: int = 0  # 1: the turn sent again after its first try failed
    replica: str = ""  # the router's x-tokenmill-replica header: who streamed it
    reply: str = ""


Send = Callable[[Conversation, int, list[Message], float], Awaitable[TurnResult]]


async def play(conversations: list[Conversation], send: Send, concurrency: int, stagger_s: float,
               on_result: Optional[Callable[[TurnResult], None]] = None, retries: int = 1,
               t0: Optional[float] = None) -> tuple[list[TurnResult], float]:
    """Every conversation, turn after turn, each turn sent once the previous reply is in.

    Conversation c starts c * stagger_s in and pauses conv.think[k] before turn k, so their
    turns arrive interleaved; at most
    `concurrency` requests are in flight (the semaphore is FIFO, so waiting conversations take
    turns). A failed turn is sent again up to `retries` times (as a user presses retry); a turn
    that still fails ends its conversation.

    Args:
        send: sends one turn: (conversation, turn, messages, t0) -> TurnResult, start relative to t0.
        t0: the run's clock origin (time.perf_counter()); default now.
    Returns:
        every request's result in the order they finished, and the wall time of the run.
    """
    gate = asyncio.Semaphore(concurrency)
    results: list[TurnResult] = []
    t0 = time.perf_counter() if t0 is None else t0

    async def one(conv: Conversation) -> None:
        await asyncio.sleep(conv.cid * stagger_s)
        replies: list[str] = []
        for turn in range(len(conv.users)):
            if conv.think and conv.think[turn] > 0:
                await asyncio.sleep(conv.think[turn])
            for attempt in range(retries + 1):
                async with gate:
                    res = await send(conv, turn, conv.messages(turn, replies), t0)
                res.conversation, res.turn, res.attempt = conv.cid, turn, attempt
                results.append(res)
                if on_result is not None:
                    on_result(res)
                if res.ok:
                    break
            if not res.ok:
                return
            replies.append(res.reply)

    await asyncio.gather(*(one(c) for c in conversations))
    return results, time.perf_counter() - t0


def prefix_counters(text: str) -> tuple[float, float]:
    """(queries, hits) in tokens from a replica's Prometheus text, summed over its models."""
    queries = hits = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == QUERIES:
                queries += sample.value
            elif sample.name == HITS:
                hits += sample.value
    return queries, hits


def hit_rate(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> dict[str, float]:
    """The fleet's prefix-cache hit rate over a run: the sum of the replicas' hit deltas over the
    sum of their query deltas (in tokens)."""
    if len(before) != len(after):
        raise ValueError("one (queries, hits) pair per replica, before and after")
    queries = sum(a[0] - b[0] for b, a in zip(before, after))
    hits = sum(a[1] - b[1] for b, a in zip(before, after))
    return dict(queried_tokens=queries, hit_tokens=hits, hit_rate=hits / queries if queries else 0.0)


def summarize_policy(results: list[TurnResult], duration: float, concurrency: int,
                     num_turns: int) -> dict[str, Any]:
    """The table's figures for one policy: serve_report's summary (TTFT median and P99 over the
    requests that succeeded, output tok/s over the run's wall time) plus TTFT per turn."""
    s = summarize(results, duration, concurrency)
    by_turn: list[float] = []
    for k in range(num_turns):
        ttfts = [r.ttft for r in results if r.ok and r.turn == k]
        by_turn.append(1000 * statistics.median(ttfts) if ttfts else 0.0)
    return dict(requests=len(results), completed=s["completed"], failed=s["failed"], duration_s=duration,
                median_ttft_ms=s["median_ttft_ms"], p99_ttft_ms=s["p99_ttft_ms"], mean_ttft_ms=s["mean_ttft_ms"],
                output_tokens=s["total_output_tokens"], prompt_tokens=s["total_input_tokens"],
                output_tok_s=s["output_throughput"], median_ttft_ms_per_turn=by_turn,
                replicas_used={url: sum(1 for r in results if r.replica == url) for url in
                               sorted({r.replica for r in results if r.replica})})


def conversation_spread(results: list[TurnResult]) -> dict[int, list[str]]:
    """The replicas that streamed each conversation's turns, in turn order (a check on routing:
    cache-aware should keep a conversation on one replica)."""
    out: dict[int, list[str]] = {}
    for r in sorted((r for r in results if r.ok), key=lambda r: (r.conversation, r.turn)):
        out.setdefault(r.conversation, []).append(r.replica)
    return out


@dataclass
class Failover:
    """What the failover run records about the killed replica."""

    victim: str
    kill_at: float  # benchmark clock
    attempts_at: list[float] = field(default_factory=list)  # when the router's attempt counter for it rose
    unhealthy_at: Optional[float] = None  # when the router's /replicas first showed it down

    def judge(self, results: list[TurnResult], num_turns: int) -> dict[str, Any]:
        """Failed requests split into those that had started streaming on the victim (allowed) and
        the rest (must be none); when the router last sent to it; and whether the conversations
        it held went on elsewhere."""
        failed = [r for r in results if not r.ok]
        on_victim = [r for r in failed if r.replica == self.victim]
        last = max((t for t in self.attempts_at if t >= self.kill_at), default=None)
        # Conversations the victim served and that still had turns to go when it died.
        held = {r.conversation for r in results if r.replica == self.victim}
        done_before = {r.conversation for r in results if r.ok and r.turn == num_turns - 1
                       and r.start + r.e2e <= self.kill_at}
        open_ = held - done_before
        # Finished after the kill: a request sent just before it may have been moved off the victim.
        later = [r for r in results if r.conversation in open_ and r.start + r.e2e > self.kill_at and r.ok]
        return dict(victim=self.victim, kill_at_s=self.kill_at, failed_streaming_on_victim=len(on_victim),
                    failed_other=len(failed) - len(on_victim),
                    last_attempt_after_kill_s=None if last is None else last - self.kill_at,
                    marked_down_after_s=None if self.unhealthy_at is None else self.unhealthy_at - self.kill_at,
                    victim_conversations_open=len(open_),
                    victim_conversations_continued=len({r.conversation for r in later if r.replica != self.victim}),
                    victim_conversations_finished=len({r.conversation for r in later if r.turn == num_turns - 1}),
                    requests_after_kill_by_replica={u: sum(1 for r in results if r.start > self.kill_at
                                                           and r.replica == u)
                                                    for u in sorted({r.replica for r in results if r.replica})})
