"""`tokenmill bench serve`: a serving benchmark against a running server, printed as
`vllm bench serve` prints it.

Requests go to any OpenAI-compatible server (`--backend openai`: /v1/completions,
`openai-chat`: /v1/chat/completions; tokenmill, vLLM, llama.cpp's server, ...) or to a KServe v2
`generate_stream` endpoint (`--backend kserve`), streamed, at `--request-rate` (Poisson arrivals;
inf: all at once) and at most `--max-concurrency` at a time. Prompts come from `--dataset random`
(words cut from the shipped held-out text, fresh per request so no prefix cache serves them) or a
ShareGPT JSON / JSONL file. Token counts are the server's (the final `usage` chunk); a KServe
stream reports none, so there each event counts as one token and input tokens are not counted.
`--baseline-url` runs the same requests against a second server afterwards and prints both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tokenmill.bench.serve_report import format_report, plot_latency, summarize

logger = logging.getLogger(__name__)

_TEXT = Path(__file__).resolve().parents[2] / "data" / "demo_heldout.txt"
BACKENDS = ("openai", "openai-chat", "kserve")


@dataclass
class RequestResult:
    start: float  # seconds from the benchmark's start
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between text-carrying chunks
    token_times: list[float] = field(default_factory=list)  # when each chunk came (benchmark clock)
    prompt_tokens: int = 0
    output_tokens: int = 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server under test")
    p.add_argument("--baseline-url", default=None, help="a second server to run the same requests against")
    p.add_argument("--model", default=None, help="model name (default: the server's first, from /v1/models)")
    p.add_argument("--backend", default="openai", choices=BACKENDS)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default: inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--dataset", nargs="+", default=["random"], metavar="random | sharegpt FILE",
                   help="'random', or 'sharegpt' and a ShareGPT .json or a JSONL of {\"prompt\"|\"text\": ...}")
    p.add_argument("--random-input-len", type=int, default=128, help="words per random prompt")
    p.add_argument("--random-output-len", type=int, default=128, help="tokens to generate per request")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (tokenmill and vLLM honour it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may wait for its next data before it counts as failed")
    p.add_argument("--save-result", action="store_true", help="write the JSON result and a PNG")
    p.add_argument("--result-dir", default="bench_results")
    p.add_argument("--result-filename", default=None)


def _prompts(args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed)
    kind = args.dataset[0]
    if kind == "random":
        words = _TEXT.read_text(encoding="utf-8").split()
        n = args.random_input_len
        return [f"[{i}] " + " ".join(words[(s := rng.randrange(0, max(1, len(words) - n))):s + n])
                for i in range(args.num_prompts)]
    if kind != "sharegpt" or len(args.dataset) != 2:
        raise ValueError("--dataset is 'random' or 'sharegpt FILE'")
    path = Path(args.dataset[1])
    if not path.is_file():
        raise ValueError(f"dataset {str(path)!r} not found")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset {str(path)!r} is not valid JSON: {e}") from None
    prompts = []
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("conversations"), list) and row["conversations"]:
            first = row["conversations"][0]
            prompts.append(first.get("value") or first.get("content") or "")
        elif isinstance(row, dict):
            prompts.append(row.get("prompt") or row.get("text") or "")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"dataset {str(path)!r} holds no prompt")
    rng.shuffle(prompts)
    return (prompts * (args.num_prompts // len(prompts) + 1))[:args.num_prompts]


def _request(args: argparse.Namespace, url: str, model: str, prompt: str) -> tuple[str, dict[str, Any]]:
    n = args.random_output_len
    if args.backend == "kserve":
        params: dict[str, Any] = {"max_tokens": n, "temperature": 0}
        return f"{url}/v2/models/{model}/generate_stream", {"text_input": prompt, "parameters": params}
    body: dict[str, Any] = {"model": model, "max_tokens": n, "stream": True, "temperature": 0,
                            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.backend == "openai-chat":
        return f"{url}/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return f"{url}/v1/completions", {**body, "prompt": prompt}


async def _one(client: Any, args: argparse.Namespace, url: str, model: str, prompt: str, t0: float) -> RequestResult:
    res = RequestResult(start=time.perf_counter() - t0)
    endpoint, body = _request(args, url, model, prompt)
    last = None
    try:
        async with client.stream("POST", endpoint, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):  # an error event after some text: the request failed
                    res.error = str(chunk["error"])[:200]
                    res.e2e = time.perf_counter() - t0 - res.start
                    return res
                choices = chunk.get("choices") or []
                text = (chunk.get("text_output") if args.backend == "kserve" else
                        choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")))
                now = time.perf_counter()
                if text:
                    if last is None:
                        res.ttft = now - t0 - res.start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.token_times.append(now - t0)
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
                    res.output_tokens = chunk["usage"].get("completion_tokens") or 0
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the run goes on
        res.error = f"{type(e).__name__}: {e}"
        res.e2e = time.perf_counter() - t0 - res.start  # it was in flight until now
        return res
    res.e2e = time.perf_counter() - t0 - res.start
    res.output_tokens = res.output_tokens or len(res.token_times)
    res.ok = last is not None
    if not res.ok:
        res.error = "the stream carried no text"
    return res


async def _run(args: argparse.Namespace, url: str, prompts: list[str], arrivals: list[float],
               label: str) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=args.max_concurrency or len(prompts) or 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        model = args.model
        if model is None:
            r = await client.get(f"{url}/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts) or 1)
        bar = tqdm(total=len(prompts), desc=f"bench serve {label}", unit="req")
        t0 = time.perf_counter()

        async def go(prompt: str, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            async with gate:
                out = await _one(client, args, url, model, prompt, t0)
            bar.update(1)
            return out

        results = await asyncio.gather(*[go(p, a) for p, a in zip(prompts, arrivals)])
        duration = time.perf_counter() - t0
        bar.close()
    return list(results), duration


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.random_output_len < 1 or args.random_input_len < 1:
        raise ValueError("--num-prompts, --random-input-len and --random-output-len must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    if args.backend == "kserve" and not args.model:
        raise ValueError("--backend kserve needs --model (the KServe model name)")
    if args.backend == "kserve" and args.ignore_eos:
        raise ValueError("--ignore-eos is an OpenAI-route extension; Triton's generate extension has no such parameter")
    prompts = _prompts(args)
    rng = random.Random(args.seed + 1)
    arrivals, t = [], 0.0
    for _ in prompts:  # Poisson arrivals at the request rate; all at t=0 when it is inf
        arrivals.append(t)
        t += 0.0 if args.request_rate == float("inf") else rng.expovariate(args.request_rate)
    targets = [("tokenmill", args.base_url)] + ([("baseline", args.baseline_url)] if args.baseline_url else [])
    report: dict[str, Any] = {"backend": args.backend, "num_prompts": args.num_prompts,
                              "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
                              "dataset": args.dataset, "results": {}}
    runs = {}
    for label, url in targets:
        results, duration = asyncio.run(_run(args, url, prompts, arrivals, label))
        summary = summarize(results, duration, args.max_concurrency)
        runs[label] = results
        report["results"][label] = {"url": url, **summary,
                                    "requests": [asdict(r) | {"token_times": None} for r in results]}
        print(format_report(summary, title=None if label == "tokenmill" else f"{label}: {url}"))
    if args.baseline_url:
        a, b = report["results"]["tokenmill"], report["results"]["baseline"]
        print(f"output token throughput: {a['output_throughput'] / max(b['output_throughput'], 1e-9):.2f}x the "
              f"baseline's; median TPOT {b['median_tpot_ms'] / max(a['median_tpot_ms'], 1e-9):.2f}x lower")
    if args.save_result:
        out_dir = Path(args.result_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = args.result_filename or f"serve-{args.backend}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path = out_dir / name
        path.write_text(json.dumps(report, indent=2, default=str))
        plot_latency(runs, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    failed = sum(1 for r in runs["tokenmill"] if not r.ok)
    if failed:
        logger.warning("%d of %d requests failed; first error: %s", failed, len(prompts),
                       next(r.error for r in runs["tokenmill"] if not r.ok))
    return 0
