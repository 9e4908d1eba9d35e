"""`tokenmill bench fleet`: three `tokenmill serve` replicas behind `tokenmill router`, a
multi-turn chat workload through the router once per policy, then a replica killed mid-run.

Per policy (round-robin, least-load, cache-aware; each on a freshly started fleet, so each starts
with cold caches): TTFT median and P99, the fleet's prefix-cache hit rate (tokens, from the
replicas' /metrics), output tok/s. Goals: cache-aware's P99 TTFT at least 2x lower than
round-robin's, and its hit rate above 80%. Failover: with cache-aware, one replica is killed
(SIGKILL) a third of the way in; only requests already streaming from it may fail, and the router
must stop sending to it within 2 s. The workload lives in fleet_workload.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx
from tqdm import tqdm

from tokenmill.bench.fleet_procs import MODEL_NAME, NUM_REPLICAS, Fleet, cpu_seconds, machine_ticks
from tokenmill.bench.fleet_workload import (Conversation, Failover, Message, TurnResult, conversation_spread,
                                            hit_rate, make_conversations, play, prefix_counters, summarize_policy)
from tokenmill.bench.prefix import LLAMA_CHAT
from tokenmill.bench.throughput import random_llama
from tokenmill.router.config import POLICIES
from tokenmill.router.upstream import REPLICA_HEADER

logger = logging.getLogger(__name__)

P99_GOAL, HIT_GOAL, STOP_GOAL_S = 2.0, 0.80, 2.0
# LLAMA_CHAT (wide and shallow: weight matmuls dominate, so prefill cost grows with the tokens
# recomputed) with the demo tokenizer's 4096-token vocabulary, so the server can serve chat.
FLEET_LLAMA = {**LLAMA_CHAT, "vocab_size": 4096, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder with a tokenizer and chat template (default: a random ~35M Llama)")
    p.add_argument("--num-conversations", type=int, default=12)
    p.add_argument("--num-turns", type=int, default=10)
    p.add_argument("--new-tokens-per-turn", type=int, default=150, help="new user tokens per turn (about)")
    p.add_argument("--system-tokens", type=int, default=60, help="the system prompt all conversations share (about)")
    p.add_argument("--max-tokens", type=int, default=16, help="reply tokens per turn (ignore_eos: exactly)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="most requests in flight at once (default: one per conversation, i.e. no cap)")
    p.add_argument("--stagger", type=float, default=0.25, help="seconds between conversations' first turns")
    p.add_argument("--think-time", type=float, default=2.0,
                   help="mean seconds a user takes between a reply and the next turn (uniform 0.5-1.5x, seeded)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (OMP_NUM_THREADS)")
    p.add_argument("--policies", default=",".join(("round-robin", "least-load", "cache-aware")),
                   help="comma-separated, run in this order")
    p.add_argument("--skip-failover", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenmill/bench"))
    p.add_argument("--output-json", default="bench_results/fleet.json", help="also writes the PNG next to it")


def build_checkpoint(folder: Path) -> str:
    from tokenmill.cli import DEMO_MODEL

    model = random_llama(FLEET_LLAMA, folder)
    for name in _TOKENIZER_FILES:  # a chat server needs a tokenizer and a template
        if not (folder / name).exists():
            shutil.copy(Path(DEMO_MODEL) / name, folder / name)
    return model


async def _send_turn(client: httpx.AsyncClient, url: str, args: argparse.Namespace, streaming: dict[str, int],
                     conv: Conversation, turn: int, messages: list[Message], t0: float) -> TurnResult:
    """One streamed chat request through the router. TTFT is the first chunk with text (the
    server sends a role-only chunk at once, before the prefill)."""
    res = TurnResult(start=time.perf_counter() - t0)
    # Sampled, not greedy (a random model's greedy reply repeats one token), seeded per turn so
    # every policy gets the same replies.
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": args.max_tokens, "ignore_eos": True,
            "temperature": 1.0, "seed": args.seed * 1_000_003 + conv.cid * 1000 + turn, "stream": True,
            "stream_options": {"include_usage": True}}
    parts: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            res.replica = r.headers.get(REPLICA_HEADER, "")  # the router relays once the replica streams
            streaming[res.replica] = streaming.get(res.replica, 0) + 1
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):  # the router's event for a stream that broke off
                        res.error = str(chunk["error"])[:200]
                        break
                    text = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                    if text:
                        if not parts:
                            res.ttft = time.perf_counter() - t0 - res.start
                        parts.append(text)
                    if chunk.get("usage"):
                        res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        res.output_tokens = chunk["usage"]["completion_tokens"]
            finally:
                streaming[res.replica] -= 1
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.e2e = time.perf_counter() - t0 - res.start
    res.reply = "".join(parts)
    res.ok = not res.error and bool(parts)
    if not res.ok and not res.error:
        res.error = "the stream carried no text"
    return res


async def _warm_up(client: httpx.AsyncClient, urls: list[str]) -> None:
    """One short request straight to each replica, so no policy's first turns pay for first-call
    set-up; its text shares nothing with the workload, and it runs before the counters are read."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "warm up " * 40}], "max_tokens": 4}
    for r in await asyncio.gather(*(client.post(f"{u}/v1/chat/completions", json=body) for u in urls)):
        r.raise_for_status()


async def _scrape(client: httpx.AsyncClient, urls: list[str]) -> list[tuple[float, float]]:
    return [prefix_counters((await client.get(f"{u}/metrics")).text) for u in urls]


async def _attempts_at(client: httpx.AsyncClient, router: str, replica: str) -> float:
    """The router's attempts at `replica` so far: requests it answered plus attempts that failed."""
    text = (await client.get(f"{router}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("tokenmill_router:requests_total{", "tokenmill_router:retries_total{"))
               and f'replica="{replica}"' in line)


async def _watch_router(client: httpx.AsyncClient, fleet: Fleet, fo: Failover, t0: float, last: float,
                        stop: asyncio.Event) -> None:
    """Every 50 ms: has the router sent the victim another attempt since `last` (its count read
    just before the kill), and does its replica table show it down yet."""
    while not stop.is_set():
        try:
            sent = await _attempts_at(client, fleet.url, fo.victim)
            now = time.perf_counter() - t0
            if sent > last:
                fo.attempts_at.append(now)
            last = sent
            if fo.unhealthy_at is None:
                table = (await client.get(f"{fleet.url}/replicas")).json()["replicas"]
                if not next(r for r in table if r["url"] == fo.victim)["healthy"]:
                    fo.unhealthy_at = now
        except httpx.HTTPError as e:
            logger.debug("router poll failed: %s", e)
        await asyncio.sleep(0.05)


async def _run_policy(fleet: Fleet, convs: list[Conversation], args: argparse.Namespace, label: str,
                      failover: bool) -> dict[str, Any]:
    total = len(convs) * args.num_turns
    streaming: dict[str, int] = {}
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None), trust_env=False) as client:
        await _warm_up(client, fleet.urls)
        before = await _scrape(client, fleet.urls)
        bar = tqdm(total=total, desc=f"bench fleet {label}", unit="req")
        pids = [p.pid for p in fleet.procs] + [os.getpid()]  # replicas, router, this load generator
        cpu0, ticks0 = cpu_seconds(pids), machine_ticks()
        t0 = time.perf_counter()
        killed = asyncio.Event()
        finished = [0]
        fo: Optional[Failover] = None
        victim_counters: Optional[tuple[float, float]] = None
        watcher: Optional[asyncio.Task] = None
        stop_watch = asyncio.Event()

        async def kill() -> None:
            nonlocal fo, victim_counters, watcher
            # The replica streaming the most requests right now: the harshest moment to lose it.
            victim = max(fleet.urls, key=lambda u: (streaming.get(u, 0), -fleet.urls.index(u)))
            victim_counters = (await _scrape(client, [victim]))[0]  # its last word on the hit rate
            sent = await _attempts_at(client, fleet.url, victim)
            fleet.kill(victim)
            fo = Failover(victim, time.perf_counter() - t0)
            logger.info("killed %s at %.1f s (%d streams on it)", victim, fo.kill_at, streaming.get(victim, 0))
            watcher = asyncio.create_task(_watch_router(client, fleet, fo, t0, sent, stop_watch))

        def on_result(res: TurnResult) -> None:
            finished[0] += 1
            bar.update(1)
            if failover and not killed.is_set() and finished[0] >= total // 3:
                killed.set()
                asyncio.get_running_loop().create_task(kill())

        async def send(conv: Conversation, turn: int, messages: list[Message], t0_: float) -> TurnResult:
            return await _send_turn(client, fleet.url, args, streaming, conv, turn, messages, t0_)

        results, duration = await play(convs, send, args.concurrency, args.stagger, on_result, t0=t0)
        bar.close()
        cpu1, ticks1 = cpu_seconds(pids), machine_ticks()  # a killed replica, unreaped, still shows its time
        stop_watch.set()
        if watcher is not None:
            await watcher
        alive = [u for u in fleet.urls if fo is None or u != fo.victim]
        now = dict(zip(alive, await _scrape(client, alive)))
        after = [now.get(u) or victim_counters or (0.0, 0.0) for u in fleet.urls]
    out = summarize_policy(results, duration, args.concurrency, args.num_turns)
    out.update(hit_rate(before, after))
    # How much of the machine the fleet had: on a shared machine other work slows every policy.
    cores = os.cpu_count() or 1
    busy, ticks = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
    out.update(fleet_cpu_s=cpu1 - cpu0, fleet_cores_used=(cpu1 - cpu0) / duration,
               machine_busy=busy / ticks if ticks else 0.0,
               other_cores_used=max(0.0, (busy / ticks if ticks else 0.0) * cores - (cpu1 - cpu0) / duration))
    spread = conversation_spread(results)
    out["conversations_on_one_replica"] = sum(1 for reps in spread.values() if len(set(reps)) == 1)
    out["requests"] = [{k: v for k, v in vars(r).items() if k not in ("itl", "token_times", "reply")} for r in results]
    if fo is not None:
        out["failover"] = fo.judge(results, args.num_turns)
    return out


def _fleet_run(model: str, policy: str, convs: list[Conversation], args: argparse.Namespace, kv_bytes: int,
               logs: Path, label: str, failover: bool = False) -> dict[str, Any]:
    fleet = Fleet(model, policy, label, args, kv_bytes, logs)
    try:
        fleet.wait_ready()
        return asyncio.run(_run_policy(fleet, convs, args, label, failover))
    finally:
        fleet.stop()


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from tokenmill.bench.fleet_report import plot, print_report
    from tokenmill.bench.fleet_workload import TEXT
    from tokenmill.model_cost import ModelShape

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        raise ValueError(f"--policies takes a comma-separated list of {', '.join(POLICIES)}; got {args.policies!r}")
    args.concurrency = args.concurrency or args.num_conversations
    if min(args.num_conversations, args.new_tokens_per_turn, args.max_tokens, args.concurrency, args.threads) < 1:
        raise ValueError("--num-conversations, --new-tokens-per-turn, --max-tokens, --concurrency, --threads >= 1")
    if args.num_turns < 2 or min(args.system_tokens, args.stagger, args.think_time) < 0:
        raise ValueError("need --num-turns >= 2 and --system-tokens, --stagger, --think-time >= 0")
    model = args.model or build_checkpoint(Path(args.cache_dir) / "llama-chat-fleet")
    cfg, tok = AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    words = TEXT.read_text(encoding="utf-8").split()
    per_word = len(tok(" ".join(words[:500]))["input_ids"]) / 500  # to size turns in tokens
    convs = make_conversations(args.num_conversations, args.num_turns, round(args.new_tokens_per_turn / per_word),
                               round(args.system_tokens / per_word), args.seed, words, args.think_time)
    # The last turn's prompt, about: chat-template markup is a few tokens per message.
    final_len = args.system_tokens + args.num_turns * (args.new_tokens_per_turn + args.max_tokens + 16)
    if final_len > cfg.max_position_embeddings:
        raise ValueError(f"the last turn would need ~{final_len} positions; "
                         f"the model has {cfg.max_position_embeddings}")
    # Room on every replica for every conversation whole (round-robin spreads each over all):
    # nothing is evicted, so the policies differ only in where they send turns.
    kv_per_token = ModelShape.from_hf_config(cfg).cost("float32").kv_bytes_per_token
    kv_bytes = max(64 << 20, int(1.5 * args.num_conversations * final_len * kv_per_token))
    result: dict[str, Any] = dict(
        model=model, replicas=NUM_REPLICAS, threads_per_replica=args.threads, cpus=os.cpu_count(),
        num_conversations=args.num_conversations, num_turns=args.num_turns,
        new_tokens_per_turn=args.new_tokens_per_turn, system_tokens=args.system_tokens, max_tokens=args.max_tokens,
        concurrency=args.concurrency, stagger_s=args.stagger, think_time_s=args.think_time, seed=args.seed,
        kv_cache_bytes_per_replica=kv_bytes,
        hit_rate_unit="prompt tokens (tokenmill:prefix_cache_hits_total / tokenmill:prefix_cache_queries_total)",
        goals=dict(p99_ratio=P99_GOAL, hit_rate=HIT_GOAL, stop_sending_s=STOP_GOAL_S), policies={})
    logs = Path(tempfile.mkdtemp(prefix="tokenmill-bench-fleet-"))
    try:
        for policy in policies:
            result["policies"][policy] = _fleet_run(model, policy, convs, args, kv_bytes, logs, policy)
        if not args.skip_failover:
            result["failover"] = _fleet_run(model, "cache-aware", convs, args, kv_bytes, logs, "failover", True)
    except BaseException:
        logger.error("fleet logs kept in %s", logs)
        raise
    runs = [*result["policies"].values(), *([result["failover"]] if "failover" in result else [])]
    if any(p["failed"] > ("failover" in p) * p["failed"] for p in runs) or "failover" in result and (
            result["failover"].get("failover") is None or result["failover"]["failover"]["failed_other"]):
        logger.warning("requests failed; the replicas' and routers' logs are in %s", logs)
    else:
        shutil.rmtree(logs, ignore_errors=True)
    print_report(result)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
