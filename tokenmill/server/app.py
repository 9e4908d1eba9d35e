"""The HTTP server: OpenAI API, health, metrics. Handlers only translate; admission decides."""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tokenmill.server.access import AccessController, Refusal
from tokenmill.server.admission import Admission, CapacityLimits
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.openai import OpenAIServing
from tokenmill.server.protocol import BadRequest, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


def error_body(message: str, err_type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def build_app(engine: AsyncLLMEngine, access: AccessController, limits: CapacityLimits,
              metrics: ServerMetrics, served_model_names: list[str]) -> FastAPI:
    app = FastAPI(title="tokenmill", description="OpenAI-compatible LLM server")
    admission = Admission(engine, access, limits, metrics, served_model_names)
    serving = OpenAIServing(admission)
    created = int(time.time())

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, r: Refusal) -> JSONResponse:
        headers = {"Retry-After": str(int(r.retry_after))} if r.retry_after not in (None, float("inf")) else None
        return JSONResponse(r.to_openai_body(), status_code=r.status, headers=headers)

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, e: BadRequest) -> JSONResponse:
        metrics.reject("bad_request")
        err_type = "invalid_request_error" if e.status != 404 else "not_found_error"
        return JSONResponse(error_body(e.message, err_type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        metrics.reject("bad_request")
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
                        for err in errors[:5])
        return JSONResponse(error_body(f"invalid request: {msg}", param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(ValueError)
    async def _value(_: Request, e: ValueError) -> JSONResponse:
        metrics.reject("bad_request")
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "service_unavailable", code="engine_unavailable"), status_code=503)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_serving else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        access.keys.authenticate(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tokenmill",
             "max_model_len": admission.max_model_len} for name in served_model_names]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    return app


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use for the model (default: the model folder's name)")
    p.add_argument("--api-key", default=None, help="one API key clients must send as a Bearer token")
    p.add_argument("--api-keys-file", default=None, help="JSON file of keys with ids and optional quotas")
    p.add_argument("--signature-policy-file", default=None,
                   help="JSON client-signature policy (required headers, user-agent patterns, log|block)")
    p.add_argument("--max-num-queued-reqs", type=int, default=None,
                   help="requests running + queued before new ones get 503 (default: 2 x max-num-seqs)")
    p.add_argument("--max-num-queued-tokens", type=int, default=None,
                   help="prompt tokens queued before new requests get 503 (default: 4 x max-num-batched-tokens)")


def run_server(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    import uvicorn

    from tokenmill.llm import LLM

    access = AccessController.from_args(args.api_key, args.api_keys_file, args.signature_policy_file)
    llm = LLM(**engine_kwargs)
    core = llm.llm_engine
    core.init_utilization_peaks()  # a short probe on CPU; datasheet peaks on known GPUs
    names = args.served_model_name or [core.model_config.model.rstrip("/").rsplit("/", 1)[-1]]
    metrics = ServerMetrics(names[0])
    sched = core.scheduler_config
    limits = CapacityLimits(max_num_queued_reqs=args.max_num_queued_reqs or 2 * sched.max_num_seqs,
                            max_num_queued_tokens=args.max_num_queued_tokens or 4 * sched.max_num_batched_tokens)
    engine = AsyncLLMEngine(core, on_step=metrics.on_step)
    app = build_app(engine, access, limits, metrics, names)
    logger.info("serving %s on http://%s:%d", names[0], args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.shutdown()
        core.shutdown(graceful=not engine.is_running)
    return 0
