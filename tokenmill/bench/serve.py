"""`tokenmill bench serve`: concurrent streams against running OpenAI-compatible servers.

Sends rounds of N concurrent streaming /v1/completions requests (prompts cut from the shipped
held-out text, fresh each round so no prefix cache can serve them) and reports output tokens/s
over the round's wall time and the median time per output token (first to last token of each
stream). Give `--baseline-url` to load a second server (another tokenmill, llama.cpp's
llama-server, vLLM, ...) with the same prompts, round after round, so the two are compared under
the same machine noise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from tokenmill.bench.throughput import parse_range

logger = logging.getLogger(__name__)

_TEXT = Path(__file__).resolve().parents[2] / "data" / "demo_heldout.txt"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server under test")
    p.add_argument("--baseline-url", default=None, help="a second server to compare with, same prompts")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--num-streams", type=int, default=8)
    p.add_argument("--prompt-words", type=parse_range, default=(64, 384), help="N or LO-HI words per prompt")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="measured rounds (after one warm-up request)")
    p.add_argument("--text", default=str(_TEXT), help="text file the prompts are cut from")
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (tokenmill and vLLM honour it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, metavar="PATH", help="write JSON here, and a PNG beside it")


async def _model_name(client: Any, url: str) -> str:
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _stream(client: Any, url: str, model: str, prompt: str, max_tokens: int,
                  ignore_eos: bool = False) -> tuple[list[float], int]:
    """Arrival times of the stream's chunks that carry text, and its completion tokens (from the
    final usage chunk; the chunk count where a server sends none)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    times: list[float] = []
    tokens: Optional[int] = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens")
    return times, tokens if tokens is not None else len(times)


async def _round(client: Any, url: str, model: str, prompts: list[str], max_tokens: int,
                 ignore_eos: bool) -> dict[str, float]:
    t0 = time.perf_counter()
    streams = await asyncio.gather(*[_stream(client, url, model, p, max_tokens, ignore_eos) for p in prompts])
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in streams)
    # Per stream: first to last text chunk over the tokens between them (chunks may carry several).
    tpot = [(ts[-1] - ts[0]) / (n - 1) for ts, n in streams if len(ts) > 1 and n > 1]
    return dict(output_tokens_per_s=tokens / wall, wall_s=wall, output_tokens=tokens,
                median_time_per_output_token_ms=1000 * statistics.median(tpot) if tpot else float("nan"))


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    words = Path(args.text).read_text().split()
    rng = random.Random(args.seed)
    targets = [("tokenmill", args.url)] + ([("baseline", args.baseline_url)] if args.baseline_url else [])
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in targets}
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        models = {url: args.model or await _model_name(client, url) for _, url in targets}
        for _, url in targets:  # warm-up
            await _stream(client, url, models[url], " ".join(words[:50]), 4)
        for r in range(args.rounds):
            prompts = []
            for _ in range(args.num_streams):
                n = rng.randint(*args.prompt_words)
                start = rng.randrange(0, max(1, len(words) - n))
                prompts.append(f"[{r}] " + " ".join(words[start:start + n]))  # fresh: no prefix hits
            for name, url in targets:
                results[name].append(await _round(client, url, models[url], prompts, args.output_len,
                                                  args.ignore_eos))
                logger.info("round %d %s: %s", r, name, results[name][-1])
    return results


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The round with the highest throughput, its figures together."""
    return max(rounds, key=lambda r: r["output_tokens_per_s"])


def run(args: argparse.Namespace) -> int:
    if args.num_streams < 1 or args.rounds < 1 or args.output_len < 2:
        raise ValueError("--num-streams >= 1, --rounds >= 1 and --output-len >= 2 are required")
    if not Path(args.text).is_file():
        raise ValueError(f"prompt text {args.text!r} not found; pass --text FILE")
    results = asyncio.run(_main(args))
    summary = {name: _best(rounds) for name, rounds in results.items()}
    print(f"\n{args.num_streams} concurrent streams, {args.prompt_words[0]}-{args.prompt_words[1]} word prompts, "
          f"{args.output_len} tokens out, the best of {args.rounds} rounds")
    print(f"{'':12}{'output tok/s':>14}{'median ms/token':>17}")
    for name, s in summary.items():
        print(f"{name:12}{s['output_tokens_per_s']:>14.1f}{s['median_time_per_output_token_ms']:>17.1f}")
    if "baseline" in summary:
        b, t = summary["baseline"], summary["tokenmill"]
        print(f"{'ratio':12}{t['output_tokens_per_s'] / b['output_tokens_per_s']:>13.2f}x"
              f"{b['median_time_per_output_token_ms'] / t['median_time_per_output_token_ms']:>16.2f}x")
    if args.json:
        out: dict[str, Any] = dict(args={k: v for k, v in vars(args).items() if k != "func"}, rounds=results,
                                   summary=summary)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        _plot(summary, Path(args.json).with_suffix(".png"))
    return 0


def _plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    axes[0].bar(names, [summary[n]["output_tokens_per_s"] for n in names], color="#2a7")
    axes[0].set_title("output tokens/s")
    axes[1].bar(names, [summary[n]["median_time_per_output_token_ms"] for n in names], color="#27a")
    axes[1].set_title("median ms per output token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
