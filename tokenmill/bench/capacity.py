"""`tokenmill bench capacity`: the bouncer under offered load, against the same server without it.

It starts `tokenmill serve` on the demo model (`--max-num-seqs 8`, as the issue that asked for
admission by expected wait ran it) and sends the issue's requests: prompts of 400-800 words (words
the demo tokenizer keeps whole, so about a token each) with 64 output tokens (`ignore_eos`, so every
request costs the same). First the unloaded time to first token (one request at a time) and the
capacity the server sustains (a closed loop of 1.5 x max-num-seqs clients: requests finished per
second). Then, at each offered load (a multiple of that capacity, requests arriving at a constant
rate for `--duration` seconds), with the bouncer (`--max-queue-wait`, default 5 s) and without it
(`--max-queue-wait` and `--max-num-queued-reqs` out of reach: one unbounded queue): refusals, how
fast they are answered, admitted requests' TTFT, and KV usage once the run has drained. Requests
still without a first token `--drain` seconds after the arrivals end are cancelled and counted as
waiting unboundedly. Writes bench_results/capacity.json and capacity.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx

from tokenmill.bench.fleet_procs import free_port
from tokenmill.bench.serve import _TEXT, _request
from tokenmill.bench.serve_report import _stats

OFF = ["--max-queue-wait", "1e9", "--max-num-queued-reqs", "1000000"]  # no bouncer: one unbounded queue


@dataclass
class Result:
    start: float  # seconds from the run's start
    status: int = 0  # 0: no answer (cancelled, or a transport error)
    answer_s: float = 0.0  # until the status line came back (for a refusal: how fast it was refused)
    retry_after: Optional[float] = None
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    cancelled: bool = False  # still without a first token when the run's drain time ran out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loads", default="0.5,1,2,5,10", help="offered loads, as multiples of the measured capacity")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per load")
    p.add_argument("--drain", type=float, default=15.0, help="seconds after the arrivals before the rest is cancelled")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-queue-wait", type=float, default=None, help="the bouncer's limit (default: the server's, 5 s)")
    p.add_argument("--words", default="400-800", help="prompt length range in words")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="bench_results", help="writes capacity.json and capacity.png here")


class _Server:
    def __init__(self, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(self.port), "--grpc-port", "0",
               "--served-model-name", "demo", *extra]
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the server mid-run
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited during start-up; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not healthy within 180 s; see {log}")

    def gauges(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            for name in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting", "num_requests_admitted"):
                if line.startswith(f"tokenmill:{name}{{"):
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def drained(self, timeout: float = 30.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            g = self.gauges()
            if not any(g.values()) or time.monotonic() > deadline:
                return g
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def prompts(n: int, words_range: str, seed: int) -> list[str]:
    from tokenmill.cli import DEMO_MODEL
    from tokenmill.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO_MODEL)
    counts = Counter(_TEXT.read_text(encoding="utf-8").split())
    whole = [w for w, _ in counts.most_common(3000) if len(tok.encode(" " + w)) == 1]
    lo, hi = (int(x) for x in words_range.split("-"))
    rng = random.Random(seed)
    return [f"[{i}] " + " ".join(rng.choice(whole) for _ in range(rng.randint(lo, hi))) for i in range(n)]


async def _one(client: httpx.AsyncClient, req: argparse.Namespace, url: str, prompt: str, t0: float,
               res: Result) -> None:
    endpoint, body = _request(req, url, "demo", prompt)
    sent = time.perf_counter()
    async with client.stream("POST", endpoint, json=body) as r:
        res.status, res.answer_s = r.status_code, time.perf_counter() - sent
        if r.status_code != 200:
            await r.aread()
            ra = r.headers.get("retry-after")
            res.retry_after = float(ra) if ra else None
            return
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and res.ttft is None:
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    res.ttft = time.perf_counter() - sent
    res.e2e = time.perf_counter() - sent


async def _open_loop(url: str, texts: list[str], rate: float, duration: float, drain: float,
                     req: argparse.Namespace) -> list[Result]:
    """Requests at a constant rate for `duration` s; what has no first token `drain` s later is cancelled."""
    n = max(1, int(rate * duration))
    results = [Result(start=i / rate) for i in range(n)]
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None), trust_env=False) as client:
        t0 = time.perf_counter()

        async def go(i: int) -> None:
            await asyncio.sleep(max(0.0, results[i].start - (time.perf_counter() - t0)))
            try:
                await _one(client, req, url, texts[i % len(texts)], t0, results[i])
            except httpx.HTTPError:
                results[i].status = 0

        tasks = [asyncio.create_task(go(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=duration + drain)
        now = time.perf_counter() - t0
        for i, t in enumerate(tasks):
            if t in pending:
                t.cancel()
                if results[i].ttft is None:  # it has waited this long and is waiting still
                    results[i].cancelled, results[i].e2e = True, now - results[i].start
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def _closed_loop(url: str, texts: list[str], clients: int, seconds: float, req: argparse.Namespace) -> float:
    """Requests finished per second with `clients` sending back to back (the first 25% left out: ramp-up)."""
    ends: list[float] = []
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        t0 = time.perf_counter()

        async def loop(c: int) -> None:
            i = c
            while time.perf_counter() - t0 < seconds:
                res = Result(start=0.0)
                await _one(client, req, url, texts[i % len(texts)], t0, res)
                if res.status == 200:
                    ends.append(time.perf_counter() - t0)
                elif res.retry_after:
                    await asyncio.sleep(min(res.retry_after, 1.0))
                i += clients

        await asyncio.gather(*(loop(c) for c in range(clients)))
    steady = [t for t in ends if t >= 0.25 * seconds]
    return len(steady) / (max(steady) - 0.25 * seconds) if len(steady) > 1 else 0.0


def _summary(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    refused = [r for r in results if r.status in (429, 503)]
    ttft = [r.ttft for r in ok] + [r.e2e or 0.0 for r in results if r.cancelled]  # a cancelled one waited this long at least
    _, ttft_p50, ttft_p99 = _stats(ttft)
    _, _, refusal_p99 = _stats([r.answer_s for r in refused])
    retry = [r.retry_after for r in refused if r.retry_after is not None]
    return {"requests": len(results), "admitted": len(ok), "refused": len(refused),
            "cancelled": sum(r.cancelled for r in results), "other": len(results) - len(ok) - len(refused),
            "ttft_p50_ms": ttft_p50, "ttft_p99_ms": ttft_p99, "ttft_max_ms": 1000 * max(ttft, default=0.0),
            "refusal_p99_ms": refusal_p99, "refusal_max_ms": 1000 * max((r.answer_s for r in refused), default=0.0),
            "retry_after_values": sorted(Counter(retry).items())}


def _plot(report: dict[str, Any], path: Path) -> None:
    """Admitted TTFT, what was turned away or left waiting, and how fast refusals came, against load."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6))
    FigureCanvasAgg(fig)
    ax_ttft, ax_out, ax_fast = fig.subplots(1, 3)
    for mode, color in (("bouncer", "tab:blue"), ("no bouncer", "tab:orange")):
        rows = report["runs"][mode]
        loads = [r["load"] for r in rows]
        ax_ttft.plot(loads, [r["ttft_p99_ms"] / 1000 for r in rows], "o-", color=color, label=f"{mode}: P99")
        ax_ttft.plot(loads, [r["ttft_p50_ms"] / 1000 for r in rows], "o--", color=color, alpha=0.6, label=f"{mode}: P50")
        ax_out.plot(loads, [100 * r["refused"] / max(1, r["requests"]) for r in rows], "o-", color=color,
                    label=f"{mode}: refused at once")
        ax_out.plot(loads, [100 * r["cancelled"] / max(1, r["requests"]) for r in rows], "s:", color=color,
                    label=f"{mode}: still waiting at the end")
        refused = [r for r in rows if r["refused"]]
        if refused:
            ax_fast.plot([r["load"] for r in refused], [r["refusal_p99_ms"] for r in refused], "o-", color=color,
                         label=f"{mode}: P99")
    bound = report["max_queue_wait_s"] + report["unloaded"]["ttft_p99_ms"] / 1000
    ax_ttft.axhline(bound, color="gray", ls=":", label="max-queue-wait + unloaded P99")
    ax_fast.axhline(50, color="gray", ls=":", label="50 ms")
    for ax, name in ((ax_ttft, "admitted TTFT (s; still waiting: so far)"), (ax_out, "% of offered requests"),
                     (ax_fast, "time to a refusal (ms)")):
        ax.set_xscale("log")
        loads = [r["load"] for r in report["runs"]["bouncer"]]
        ax.set_xticks(loads, [f"{x:g}x" for x in loads])
        ax.minorticks_off()
        ax.set_xlabel("offered load (x capacity)")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    fig.suptitle(f"tokenmill bench capacity: demo model, --max-num-seqs {report['max_num_seqs']}, "
                 f"{report['words']}-word prompts, {report['output_len']} tokens, capacity "
                 f"{report['capacity_rps']:.2f} requests/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def _goals(report: dict[str, Any]) -> list[tuple[str, bool, str]]:
    rows = report["runs"]["bouncer"]
    low = [r for r in rows if r["load"] <= 1]
    top = max(rows, key=lambda r: r["load"])
    bound = report["max_queue_wait_s"] * 1000 + report["unloaded"]["ttft_p99_ms"]
    return [
        ("no refusal at <= 1x", all(r["refused"] == 0 for r in low),
         ", ".join(f"{r['load']:g}x: {r['refused']}" for r in low)),
        (f"refusals answered in < 50 ms at {top['load']:g}x", top["refusal_p99_ms"] < 50,
         f"P99 {top['refusal_p99_ms']:.1f} ms, max {top['refusal_max_ms']:.1f} ms"),
        (f"admitted P99 TTFT at {top['load']:g}x <= max-queue-wait + unloaded P99", top["ttft_p99_ms"] <= bound,
         f"{top['ttft_p99_ms']:.0f} ms vs {bound:.0f} ms"),
        ("no request waits unboundedly (none cancelled)", all(r["cancelled"] == 0 for r in rows),
         f"worst TTFT {max(r['ttft_max_ms'] for r in rows):.0f} ms"),
        ("KV usage back to 0 after every run", all(r["after"].get("kv_cache_usage_perc", 1) == 0 for r in rows),
         " ".join(f"{r['after'].get('kv_cache_usage_perc', 1):.2f}" for r in rows)),
    ]


def run(args: argparse.Namespace) -> int:
    loads = [float(x) for x in args.loads.split(",")]
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = prompts(400, args.words, args.seed)
    req = argparse.Namespace(backend="openai", random_output_len=args.output_len, ignore_eos=True)
    base = ["--max-num-seqs", str(args.max_num_seqs)]
    on = base + (["--max-queue-wait", str(args.max_queue_wait)] if args.max_queue_wait is not None else [])
    report: dict[str, Any] = {"max_num_seqs": args.max_num_seqs, "words": args.words, "output_len": args.output_len,
                              "duration_s": args.duration, "max_queue_wait_s": args.max_queue_wait or 5.0, "runs": {}}
    t_start = time.monotonic()
    for mode, flags in (("bouncer", on), ("no bouncer", base + OFF)):
        server = _Server(flags, out / f"capacity-{mode.replace(' ', '-')}.log")
        try:
            if mode == "bouncer":
                asyncio.run(_closed_loop(server.url, texts[-8:], 2, 6.0, req))  # warm-up: steps measured
                unloaded = [Result(0.0) for _ in range(8)]
                for i, res in enumerate(unloaded):
                    asyncio.run(_one_client(server.url, req, texts[100 + i], res))
                _, p50, p99 = _stats([r.ttft for r in unloaded if r.ttft is not None])
                report["unloaded"] = {"ttft_p50_ms": p50, "ttft_p99_ms": p99}
                cap = asyncio.run(_closed_loop(server.url, texts[200:], args.max_num_seqs * 3 // 2, 25.0, req))
                report["capacity_rps"] = cap
                print(f"unloaded TTFT P50 {p50:.0f} ms, P99 {p99:.0f} ms; capacity {cap:.2f} requests/s", flush=True)
                server.drained()
            rows = []
            for load in loads:
                results = asyncio.run(_open_loop(server.url, texts, load * report["capacity_rps"], args.duration,
                                                 args.drain, req))
                row = {"load": load, **_summary(results), "after": server.drained()}
                rows.append(row)
                print(f"{mode:>10} {load:>5g}x: {row['admitted']:>4} admitted, {row['refused']:>4} refused "
                      f"(P99 {row['refusal_p99_ms']:.1f} ms), {row['cancelled']} cancelled; TTFT P50 "
                      f"{row['ttft_p50_ms']:.0f} ms P99 {row['ttft_p99_ms']:.0f} ms; KV after "
                      f"{row['after'].get('kv_cache_usage_perc', -1):.2f}; Retry-After {row['retry_after_values']}",
                      flush=True)
            report["runs"][mode] = rows
        finally:
            server.stop()
    report["wall_s"] = time.monotonic() - t_start
    report["goals"] = [{"goal": g, "pass": ok, "measured": m} for g, ok, m in _goals(report)]
    (out / "capacity.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "capacity.png")
    for g in report["goals"]:
        print(f"{'PASS' if g['pass'] else 'MISS'}  {g['goal']}: {g['measured']}")
    print(f"wrote {out / 'capacity.json'} and {out / 'capacity.png'} ({report['wall_s']:.0f} s)")
    return 0


async def _one_client(url: str, req: argparse.Namespace, prompt: str, res: Result) -> None:
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        await _one(client, req, url, prompt, time.perf_counter(), res)
