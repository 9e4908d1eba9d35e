"""What the router's tests share: small fake replicas (FastAPI apps on loopback ports, their load
and failures set by the test), a router in front of them, and the fixtures that start both."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import free_port
from tokenmill.router.config import RouterConfig
from tokenmill.router.discovery import Discovery
from tokenmill.router.proxy import build_app
from tokenmill.router.replicas import Replica

CHAT = "/v1/chat/completions"


def stop_all(servers: list[Any]) -> None:
    """Stop servers together (each takes a uvicorn tick or two to wind down)."""
    threads = [threading.Thread(target=s.stop) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_for(check: Callable[[], Any], timeout: float = 3.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class UvicornThread:
    """An ASGI app served on a loopback port from a background thread; stop() closes the port
    (connections are then refused), start() opens it again on the same port."""

    def __init__(self, app: FastAPI, port: Optional[int] = None, lifespan: str = "off",
                 host: str = "127.0.0.1") -> None:
        self.app, self.lifespan, self.host = app, lifespan, host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.server: Optional[uvicorn.Server] = None
        self.thread: Optional[threading.Thread] = None

    def start(self) -> "UvicornThread":
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="critical",
                                lifespan=self.lifespan, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 10, "uvicorn to start")
        assert self.server.started, "server did not start"
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None and self.thread.is_alive():
            self.server.should_exit = self.server.force_exit = True
            self.thread.join(10)


# --- fake replicas ------------------------------------------------------------------------------

@dataclass
class Fake:
    """One fake replica: its state (set by the test) and what it saw."""

    name: str
    running: float = 0.0
    waiting: float = 0.0
    kv: float = 0.0
    # ok | busy (503) | error (500) | hang | fail (stream breaks after fail_after chunks) | down
    # | frozen (nothing answers, health checks included: a replica whose process is stuck)
    mode: str = "ok"
    retry_after: int = 5
    chunks: int = 3
    chunk_delay: float = 0.0
    fail_after: int = 1
    api_key: Optional[str] = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    cancelled: int = 0
    server: Optional[UvicornThread] = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def events(self, chat: bool) -> list[str]:
        """The SSE events this replica streams (so a test can compare what the router relayed)."""
        def event(i: int) -> str:
            choice = {"index": 0, "delta": {"content": f"{self.name}-{i} "}} if chat else \
                {"index": 0, "text": f"{self.name}-{i} "}
            return f"data: {json.dumps({'replica': self.name, 'choices': [choice]})}\n\n"
        return [event(i) for i in range(self.chunks)] + ["data: [DONE]\n\n"]

    def app(self) -> FastAPI:
        app = FastAPI()

        async def frozen() -> None:
            while self.mode == "frozen":
                await asyncio.sleep(0.02)

        @app.get("/health")
        async def health():
            await frozen()
            if self.mode == "down":
                return JSONResponse({"status": "unavailable"}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            lines = []
            for metric, value in (("num_requests_running", self.running), ("num_requests_waiting", self.waiting),
                                  ("kv_cache_usage_perc", self.kv)):
                lines += [f"# HELP tokenmill:{metric} x", f"# TYPE tokenmill:{metric} gauge",
                          f'tokenmill:{metric}{{model_name="demo"}} {value}']
            return PlainTextResponse("\n".join(lines) + "\n")

        def refused(request: Request) -> Optional[JSONResponse]:
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "bad key", "type": "authentication_error"}}, 401)
            return None

        @app.get("/v1/models")
        async def models(request: Request):
            return refused(request) or {"object": "list", "data": [{"id": "demo", "owned_by": self.name}]}

        async def generate(request: Request, chat: bool):
            body = await request.json()
            self.requests.append({"headers": dict(request.headers), "body": body})
            if (r := refused(request)) is not None:
                return r
            if self.mode == "busy":
                return JSONResponse({"error": {"message": "full", "type": "service_unavailable"}}, 503,
                                    headers={"Retry-After": str(self.retry_after)})
            if self.mode == "error":
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
            await frozen()
            if self.mode == "hang":  # as the real server does: notice the client leaving, then abort
                while not await request.is_disconnected():
                    await asyncio.sleep(0.02)
                self.cancelled += 1
                return JSONResponse({}, 499)
            if not body.get("stream"):
                text = f"reply from {self.name}"
                choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                    {"index": 0, "text": text}
                return {"replica": self.name, "choices": [choice]}

            async def stream():
                done = False
                try:
                    for i, event in enumerate(self.events(chat)):
                        if self.mode == "fail" and i == self.fail_after:
                            raise RuntimeError("replica died mid-stream")
                        if i and self.chunk_delay:
                            await asyncio.sleep(self.chunk_delay)
                        await frozen()
                        yield event
                    done = True
                finally:
                    if not done and self.mode != "fail":
                        self.cancelled += 1
            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await generate(request, chat=True)

        return app


@pytest.fixture
def fleet() -> Iterator[Callable[..., list[Fake]]]:
    started: list[UvicornThread] = []

    def make(*names: str, host: str = "127.0.0.1", port: Optional[int] = None) -> list[Fake]:
        fakes = [Fake(n) for n in names]
        for f in fakes:
            f.server = UvicornThread(f.app(), port=port, host=host).start()
            started.append(f.server)
        return fakes

    yield make
    stop_all(started)


@dataclass
class Router:
    server: UvicornThread
    app: FastAPI
    client: httpx.Client

    @property
    def fleet(self):
        return self.app.state.fleet

    def chat(self, messages: list[dict], headers: Optional[dict[str, str]] = None, **kw: Any) -> httpx.Response:
        return self.client.post(CHAT, json={"model": "demo", "messages": messages, **kw}, headers=headers)

    def replica_of(self, response: httpx.Response) -> str:
        assert response.status_code == 200, response.text
        return response.headers["x-tokenmill-replica"]

    def metrics(self) -> dict[str, float]:
        out = {}
        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


@pytest.fixture
def router() -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def make(fakes: list[Fake], specs: Optional[list[str]] = None, discovery: Optional[Discovery] = None,
             **config: Any) -> Router:
        replicas = [Replica.parse(s) for s in specs] if specs is not None else [Replica(f.url) for f in fakes]
        app = build_app(RouterConfig(**config), replicas, discovery)
        server = UvicornThread(app, lifespan="on").start()
        r = Router(server, app, httpx.Client(base_url=server.url, timeout=30, trust_env=False))
        made.append(r)
        return r

    yield make
    for r in made:
        r.client.close()
    stop_all([r.server for r in made])
