"""The HTTP server: OpenAI API, health, metrics. Handlers only translate; admission decides."""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tokenmill.server.served_models import ServedModel, ServedModels
from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.server.access import AccessController
from tokenmill.server.admission import CapacityLimits
from tokenmill.server.chat_tools import ToolSettings
from tokenmill.server.errors import HealthResponse, error_body, error_responses
from tokenmill.server.access_log import note_model, note_refusal
from tokenmill.server.kserve.http import kserve_router
from tokenmill.server.lifecycle import Lifecycle, Server
from tokenmill.server.middleware import AccessLogMiddleware
from tokenmill.server.live_stats import live_stats
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, request_fields
from tokenmill.server.refusal import Refusal
from tokenmill.structured.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("tokenmill.server")

WEB_DIR = Path(__file__).parent / "web"


# What each endpoint can answer besides 200, for the OpenAPI document (generated clients and
# schema-driven fuzzers see the real API).
_GENERATE_ERRORS = {200: {"description": "The completion; with `stream`, server-sent events",
                          "content": {"application/json": {}, "text/event-stream": {}}},
                    **error_responses(400, 401, 403, 404, 429, 503)}
_MODELS_ERRORS = error_responses(401)


def build_app(served: list[ServedModel], access: AccessController, server_metrics: ServerMetrics,
              grpc_address: Optional[tuple[str, int]] = None, lifecycle: Optional[Lifecycle] = None,
              log_prompts: bool = False) -> FastAPI:
    """The server's routes for every served model (requests pick one by name); with
    grpc_address, the gRPC inference service runs beside them on the same event loop (started
    and stopped with the app). `lifecycle` says when the server drains for a shutdown;
    `log_prompts` puts the prompts' text in the access log."""
    lifecycle = lifecycle or Lifecycle()
    registry = ServedModels(served, access, server_metrics, lifecycle)
    metrics = registry.default_metrics  # for errors raised before a request names its model

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Imported here: its protobuf descriptors (package `inference`) would clash with
        # tritonclient.grpc's own in a process that imports both and never starts the service.
        from tokenmill.server.kserve.grpc_server import start_grpc_server

        grpc_server = (await start_grpc_server(registry.kserve, lambda: registry.ready, registry.index,
                                                 *grpc_address, log_prompts=log_prompts)
                       if grpc_address else None)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)

    app = FastAPI(title="tokenmill", description="OpenAI-compatible LLM server, and Triton's (KServe v2) protocol",
                  lifespan=lifespan)
    app.include_router(kserve_router(registry.kserve, lambda: registry.ready, registry.index))  # /v2/...
    app.add_middleware(AccessLogMiddleware, lifecycle=lifecycle, log_prompts=log_prompts)  # x-request-id, access log
    # The chat page and the dashboard: static files shipped in the package, nothing from a CDN.
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    created = int(time.time())

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, r: Refusal) -> JSONResponse:
        note_refusal(r.reason, r.code)
        headers = {"Retry-After": str(int(r.retry_after))} if r.retry_after not in (None, float("inf")) else None
        return JSONResponse(r.to_openai_body(), status_code=r.status, headers=headers)

    @app.exception_handler(InvalidRequest)  # the engine's rules, and the server's (BadRequest)
    async def _bad_request(_: Request, e: InvalidRequest) -> JSONResponse:
        metrics.reject("bad_request")
        status = getattr(e, "status", 400)
        note_refusal("bad_request", e.code)
        return JSONResponse(error_body(e.message, status, param=e.param, code=e.code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        metrics.reject("bad_request")
        note_refusal("bad_request", None)
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
                        for err in errors[:5])
        return JSONResponse(error_body(f"invalid request: {msg}", 400, param=".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # Starlette's own headers stay (a 405's Allow header lists the methods the route takes).
        note_refusal("bad_request", None)
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(_: Request, e: ValueError) -> JSONResponse:
        metrics.reject("bad_request")
        note_refusal("bad_request", None)
        return JSONResponse(error_body(str(e), 400), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        note_refusal("engine_unavailable", "engine_unavailable")
        return JSONResponse(error_body(str(e), 503, code="engine_unavailable"), status_code=503)

    @app.get("/health", response_model=HealthResponse,
             responses={503: {"model": HealthResponse,
                              "description": "The engine is not serving, or the server is shutting down."}})
    async def health() -> JSONResponse:
        if lifecycle.draining:  # a router or a Kubernetes Service stops sending here
            return JSONResponse(HealthResponse(status="shutting_down").model_dump(), status_code=503)
        serving_now = registry.serving
        return JSONResponse(HealthResponse(status="ok" if serving_now else "unavailable").model_dump(),
                            status_code=200 if serving_now else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(generate_latest(server_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", responses={200: {"description": "Each model's load, the numbers of /metrics as JSON"}})
    async def stats() -> dict[str, Any]:
        return live_stats(server_metrics.registry)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return FileResponse(WEB_DIR / "dashboard.html")

    @app.get("/v1/models", responses=_MODELS_ERRORS)
    async def list_models(request: Request) -> JSONResponse:
        access.keys.authenticate(request.headers.get("authorization"))
        fields = request_fields()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tokenmill",
             "max_model_len": registry.openai(name).admission.max_model_len, "request_fields": fields}
            for name in registry.ready_names]})

    @app.post("/v1/completions", responses=_GENERATE_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        note_model(body.model)
        return await registry.openai(body.model).completions(body, request)

    @app.post("/v1/chat/completions", responses=_GENERATE_ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request):
        note_model(body.model)
        return await registry.openai(body.model).chat(body, request)

    def openapi() -> dict[str, Any]:
        # FastAPI documents a 422 for every body it validates; this server answers those with 400
        # and the OpenAI error body (see _invalid), so the 422s would describe an API that is not.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema["paths"].values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            # The models this server serves: what `model` (and /v2's {name}) may be.
            names = registry.ready_names
            versions = sorted({m.version for m in served if m.engine is not None})
            for body in ("CompletionRequest", "ChatCompletionRequest"):
                prop = schema["components"]["schemas"].get(body, {}).get("properties", {}).get("model")
                if prop is not None:
                    prop["enum"] = names
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    for param in op.get("parameters", []):
                        if path.startswith("/v2/models/") and param.get("name") in ("name", "version"):
                            param["schema"]["enum"] = names if param["name"] == "name" else versions
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use for the model (default: the model folder's name)")
    p.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model of a Triton model repository (DIR/<name>/config.pbtxt, DIR/<name>/<version>/)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="port of the gRPC inference service (Triton's protocol; 0: off)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics' Prometheus text on this port, as Triton does on 8002 (default: off)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide whether to call a tool (tool_choice "auto"); needs --tool-call-parser')
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool calls are written in the model's replies (hermes: <tool_call> JSON blocks)")
    p.add_argument("--api-key", default=None, help="one API key clients must send as a Bearer token")
    p.add_argument("--api-keys-file", default=None, help="JSON file of keys with ids and optional quotas")
    p.add_argument("--signature-policy-file", default=None,
                   help="JSON client-signature policy (required headers, user-agent patterns, log|block)")
    p.add_argument("--max-num-queued-reqs", type=int, default=None,
                   help="requests running + queued before new ones get 503 "
                        "(default: 3 x max-num-seqs: the batch and a queue twice its size)")
    p.add_argument("--max-num-queued-tokens", type=int, default=None,
                   help="prompt tokens queued before new requests get 503 "
                        "(default: max-num-queued-reqs x max-model-len, so the request limit and the wait bind first)")
    p.add_argument("--max-queue-wait", type=float, default=None, metavar="SECONDS",
                   help="admit a request only if it can be expected to start within this many seconds; "
                        "otherwise 503 with Retry-After from the estimate (default: 5)")
    p.add_argument("--log-prompts", action="store_true",
                   help="put each request's prompt text in its access-log line (default: never)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may run before they are aborted (default: 30)")


def _start_model(names: list[str], version: str, kwargs: dict[str, Any], args: argparse.Namespace,
                 metrics: ServerMetrics) -> tuple[ServedModel, Any]:
    """One model's engine, its engine thread and its capacity limits."""
    from tokenmill.llm import LLM

    llm = LLM(**kwargs)
    core = llm.llm_engine
    core.init_utilization_peaks()  # a short probe on CPU; datasheet peaks on known GPUs
    sched = core.scheduler_config
    limits = CapacityLimits.defaults(sched, args.max_num_queued_reqs, args.max_num_queued_tokens, args.max_queue_wait)
    engine = AsyncLLMEngine(core, on_step=metrics.model(names[0]).on_step)
    tools = ToolSettings(args.enable_auto_tool_choice, args.tool_call_parser)
    return ServedModel(names, version, engine, limits, tools=tools), llm


def _load_models(args: argparse.Namespace, engine_kwargs: dict[str, Any],
                 metrics: ServerMetrics) -> tuple[list[ServedModel], list[Any]]:
    """The command line's model, or every model of --model-repository (a model that cannot load
    is kept with its reason, and the others are served)."""
    if not args.model_repository:
        names = args.served_model_name or [str(engine_kwargs["model"]).rstrip("/").rsplit("/", 1)[-1]]
        served, llm = _start_model(names, "1", engine_kwargs, args, metrics)
        return [served], [llm]
    from tokenmill.server.model_repository import load_repository

    if args.model or args.served_model_name:
        raise ValueError("--model-repository serves the repository's models: give no MODEL or --served-model-name")
    served, llms = [], []
    for m in load_repository(args.model_repository):
        if m.error is None:
            try:
                s, llm = _start_model([m.name], m.version, {**engine_kwargs, "model": m.checkpoint,
                                                           **m.engine_settings}, args, metrics)
                served.append(s)
                llms.append(llm)
                continue
            except Exception as e:  # noqa: BLE001 - a broken model must not take the others down
                m.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logger.warning("model %r could not load: %s", m.name, m.error)
        served.append(ServedModel([m.name], m.version or "1", error=m.error))
    return served, llms


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _kernels(core: Any) -> str:
    """The kernels the engine runs: the linear layers' (forced or timed per shape and batch
    size), the fused CPU ops, quantization."""
    runner = core.model_runner
    backend = core.model_config.linear_backend
    counts = Counter(name for plan in runner.linear_backends.values() for name in plan.values())
    if backend != "auto":
        linear = f"linear {backend} (--linear-backend)"
    else:
        linear = "linear timed per shape and batch size: " + ", ".join(
            f"{name} {n}" for name, n in counts.most_common()) + f" of {sum(counts.values())} choices"
    parts = [linear]
    if runner.device.type == "cpu":
        from tokenmill.kernels import cpu_ops

        parts.append("fused CPU ops " + ("on" if cpu_ops.load() else "off (ATen)"))
    quant = getattr(core.model_config.hf_config, "quantization_config", None)
    if quant:
        q = quant if isinstance(quant, dict) else vars(quant)
        parts.append(f"{q.get('quant_method', 'quantized')} {q.get('bits', '?')}-bit")
    return "; ".join(parts)


def log_startup(served: list[ServedModel], llms: list[Any], args: argparse.Namespace) -> None:
    """What the server runs, each model in four lines: model, kernels, KV pool, limits."""
    for m, llm in zip([m for m in served if m.engine is not None], llms):
        core = llm.llm_engine
        mc, sc, runner, bm = core.model_config, core.scheduler_config, core.model_runner, core.block_manager
        name = m.names[0]
        arch = ",".join(getattr(mc.hf_config, "architectures", None) or [type(mc.hf_config).__name__])
        dtype = str(runner.dtype).removeprefix("torch.")
        par = core.parallel_config
        layout = (f", tensor parallel {par.tensor_parallel_size} x pipeline parallel {par.pipeline_parallel_size}"
                  if par.world_size > 1 else "")
        spec = core.speculative_config
        logger.info("model %s: %s (%s), %s on %s%s, %.1f MiB of weights%s", name, mc.model, arch, dtype,
                    runner.device, layout, runner.weight_bytes / 2**20,
                    f", speculative decoding {getattr(spec, 'method', spec)}" if spec is not None else "",
                    extra={"model": name, "dtype": dtype, "device": str(runner.device)})
        logger.info("kernels %s: %s", name, _kernels(core))
        kv_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
        kv_tokens = bm.num_blocks * bm.block_size
        spill = f", spill tier {bm.spill.num_blocks} blocks" if bm.spill is not None else ""
        logger.info("KV pool %s: %d blocks x %d tokens = %d tokens, %d bytes (%.1f MiB); prefix caching %s%s",
                    name, bm.num_blocks, bm.block_size, kv_tokens, kv_bytes, kv_bytes / 2**20,
                    "on" if bm.enable_prefix_caching else "off", spill,
                    extra={"kv_blocks": bm.num_blocks, "kv_tokens": kv_tokens, "kv_bytes": kv_bytes})
        lim = m.limits
        wait = getattr(lim, "max_queue_wait", None)
        logger.info("limits %s: max_num_seqs=%d max_num_batched_tokens=%d max_model_len=%d; queue: "
                    "max_num_queued_reqs=%d max_num_queued_tokens=%d%s; scheduling %s; shutdown timeout %g s",
                    name, sc.max_num_seqs, sc.max_num_batched_tokens, sc.max_model_len, lim.max_num_queued_reqs,
                    lim.max_num_queued_tokens, f" max_queue_wait={wait:g}s" if wait is not None else "",
                    sc.scheduling_policy, args.shutdown_timeout,
                    extra={"max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
                           "max_model_len": sc.max_model_len, "max_num_queued_reqs": lim.max_num_queued_reqs,
                           "max_num_queued_tokens": lim.max_num_queued_tokens, "max_queue_wait": wait,
                           "scheduling_policy": sc.scheduling_policy, "shutdown_timeout": args.shutdown_timeout})
    for m in served:
        if m.engine is None:
            logger.warning("model %s is not served: %s", m.names[0], m.error)


def log_urls(served: list[ServedModel], args: argparse.Namespace) -> None:
    base = f"http://{_url_host(args.host)}:{args.port}"
    grpc = f"; gRPC (KServe v2) {_url_host(args.host)}:{args.grpc_port}" if args.grpc_port else ""
    metrics = f" and :{args.metrics_port}/metrics" if args.metrics_port else ""
    logger.info("serving %s: API %s/v1, chat page %s/, dashboard %s/dashboard, metrics %s/metrics%s%s",
                ", ".join(n for m in served if m.engine is not None for n in m.names), base, base, base, base,
                metrics, grpc, extra={"url": f"{base}/v1"})


def _stop_engines(served: list[ServedModel], llms: list[Any], grace_s: float = 5.0) -> None:
    """Stop every engine once the requests aborted at the end have left it (their KV blocks back
    in the pool), and say what is still held."""
    engines = [(m, llm) for m, llm in zip([m for m in served if m.engine is not None], llms)]
    deadline = time.monotonic() + grace_s
    for m, _ in engines:
        while m.engine.is_serving and m.engine.admission_view()[0] and time.monotonic() < deadline:
            time.sleep(0.02)
    for m, llm in engines:
        m.engine.shutdown()
        core = llm.llm_engine
        core.shutdown(graceful=not m.engine.is_running)
        bm = core.block_manager
        logger.info("KV blocks in use at exit: %d of %d (%s)", bm.num_used_blocks, bm.num_blocks, m.names[0],
                    extra={"kv_blocks_in_use": bm.num_used_blocks, "model": m.names[0]})


def run_server(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    import uvicorn

    shutdown_timeout = getattr(args, "shutdown_timeout", 30.0)
    if not shutdown_timeout >= 0:  # NaN fails this too
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0; got {shutdown_timeout}")
    access = AccessController.from_args(args.api_key, args.api_keys_file, args.signature_policy_file)
    metrics = ServerMetrics()
    served, llms = _load_models(args, engine_kwargs, metrics)
    lifecycle = Lifecycle()
    try:
        app = build_app(served, access, metrics, grpc_address=(args.host, args.grpc_port) if args.grpc_port else None,
                        lifecycle=lifecycle, log_prompts=getattr(args, "log_prompts", False))
        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
        log_startup(served, llms, args)
        # log_config=None: uvicorn's loggers go through tokenmill's handler and format (tokenmill/logs.py);
        # its access log is off, the server writes its own (access_log.py).
        config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                timeout_graceful_shutdown=5)
        server = Server(config, lifecycle, shutdown_timeout, on_started=lambda: log_urls(served, args))
        # Fast refusals (admission.py) need the event loop to run when asked: the engine thread holds
        # the GIL for a step's Python work, and at the default 5 ms switch interval the loop waits that
        # long at every resumption; a full collection over the ~400k objects of the libraries and the
        # model stops both threads for ~0.3 s, so they are frozen out of it.
        sys.setswitchinterval(0.001)
        gc.collect()
        gc.freeze()
        server.run()
    finally:
        # From here a signal exits at once: the requests are gone, what is left is a few seconds.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: os._exit(128 + s))
        _stop_engines(served, llms)
    return 0
