"""A tiny fake replica for tests/test_router_netns.py, run as its own process (inside a network
namespace there): GET /health, GET /metrics with the load gauges the router reads (replicas.py
parse_load), and POST /v1/chat/completions answering a non-streamed chat completion that names
the replica.

    python -m tests.netns_replica --host 10.213.1.2 --port 8000 --name r1
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse


def make_app(name: str, metrics_delay_s: float = 0.0) -> FastAPI:
    app = FastAPI()
    ids = itertools.count()
    served = {"requests": 0}

    @app.get("/health")
    async def health():
        return {"status": "ok", "replica": name}

    @app.get("/metrics")
    async def metrics():
        if metrics_delay_s:  # a busy replica's exporter is not instant
            await asyncio.sleep(metrics_delay_s)
        lines = []
        for metric, value in (("num_requests_running", 0.0), ("num_requests_waiting", 0.0),
                              ("kv_cache_usage_perc", 0.0)):
            lines += [f"# HELP tokenmill:{metric} fake replica {name}", f"# TYPE tokenmill:{metric} gauge",
                      f'tokenmill:{metric}{{model_name="demo"}} {value}']
        lines += ["# HELP fake_requests_total chat completions served", "# TYPE fake_requests_total counter",
                  f"fake_requests_total {served['requests']}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        served["requests"] += 1
        turn = sum(1 for m in body.get("messages", []) if m.get("role") == "user")
        text = f"reply from {name} (turn {turn})"
        return {"id": f"chatcmpl-{name}-{next(ids)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "demo"), "replica": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", required=True)
    p.add_argument("--timeout-keep-alive", type=int, default=30,
                   help="seconds an idle connection is kept (uvicorn's default is 5)")
    p.add_argument("--metrics-delay", type=float, default=0.0, help="seconds each GET /metrics takes")
    args = p.parse_args()
    uvicorn.run(make_app(args.name, args.metrics_delay), host=args.host, port=args.port, log_level="warning",
                access_log=False, timeout_keep_alive=args.timeout_keep_alive)


if __name__ == "__main__":
    main()
