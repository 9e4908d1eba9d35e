"""The router's HTTP app: the OpenAI routes, relayed to the fleet, and the router's own health,
metrics and replica table. Handlers only translate; forward.py decides where a request goes."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.router.config import RouterConfig
from tokenmill.router.discovery import Discovery
from tokenmill.router.forward import Forwarder
from tokenmill.router.metrics import RouterMetrics
from tokenmill.router.policy import make_policy
from tokenmill.router.replicas import Replica, ReplicaSet
from tokenmill.server.api_keys import KeyStore
from tokenmill.server.errors import error_body

logger = logging.getLogger(__name__)


def build_app(config: RouterConfig, replicas: list[Replica], discovery: Optional[Discovery] = None) -> FastAPI:
    """The router in front of `replicas` (and those `discovery` finds, looked for again every
    config.discovery_interval_s). Its health poller and HTTP client live with the app (started
    and stopped by its lifespan); app.state holds fleet, policy, metrics for inspection."""
    fleet = ReplicaSet(replicas, config.health_interval_s, config.health_timeout_s, discovery,
                       config.discovery_interval_s)
    policy = make_policy(config)
    metrics = RouterMetrics(fleet)
    keys = KeyStore.from_config(config.api_key, config.api_keys_file)  # a bad file fails here, at start

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No connection limit: a stream holds its connection for its whole life, and a pool cap
        # would queue requests in the router instead of letting the replicas refuse them.
        client = httpx.AsyncClient(timeout=httpx.Timeout(config.upstream_timeout_s, connect=config.connect_timeout_s,
                                                         pool=None),
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                   trust_env=False)
        app.state.forwarder = Forwarder(config, fleet, policy, metrics, client, keys)
        await fleet.start()
        logger.info("routing to %d replicas (%d healthy) with policy %s", len(fleet.replicas),
                    len(fleet.healthy()), config.policy)
        try:
            yield
        finally:
            await fleet.stop()
            await client.aclose()

    app = FastAPI(title="tokenmill router", description="OpenAI-compatible router in front of tokenmill replicas",
                  lifespan=lifespan)
    app.state.fleet, app.state.policy, app.state.metrics = fleet, policy, metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await request.app.state.forwarder.generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await request.app.state.forwarder.generate(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await request.app.state.forwarder.models(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = bool(fleet.healthy())
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/replicas")
    async def replica_table(request: Request) -> Response:
        # The table names the replicas' addresses: with keys on, only key holders see it.
        # /health and /metrics stay open, as on the replicas, for probes and Prometheus.
        if (refusal := request.app.state.forwarder.refused(request)) is not None:
            return refusal
        return JSONResponse({"policy": config.policy, "region": config.region,
                             "replicas": [r.describe() for r in fleet.replicas]})

    return app
