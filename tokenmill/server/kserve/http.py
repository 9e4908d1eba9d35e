"""The open inference protocol's HTTP routes (`/v2/...`, as Triton serves them), beside the
OpenAI routes on the same server: health, server and model metadata, readiness, `infer` with
JSON or binary tensors, and Triton's generate extension (`generate`, `generate_stream`).

Errors answer `{"error": "..."}` with 400 (404 for an unknown model or version, 401/403/429/503
from access and capacity control), as Triton does.
"""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any, Callable, Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.server import access_log
from tokenmill.server.kserve.serving import KServeError, KServeServing
from tokenmill.engine.async_engine import EngineDeadError
from tokenmill.server.errors import KServeErrorResponse, error_responses
from tokenmill.server.kserve.tensors import TensorError, http_response, loads, parse_http_request

def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(*statuses, body=KServeErrorResponse)


_NO_BODY = {"description": "OK (no body)", "content": {}}
_GENERATE_PARAMETERS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "exclude_input_in_output"}
_LIMITS = {np.int32: 2**31 - 1, np.uint64: 2**64 - 1}


def _error(e: Exception) -> JSONResponse:
    err = KServeError.of(e)
    access_log.note_refusal(err.reason or "error", err.code)
    headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after not in (None, float("inf")) else None
    return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)


def _server_version() -> str:
    try:
        return package_version("tokenmill")
    except PackageNotFoundError:
        return "0"


def _generate_inputs(body: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("text_input"), str):
        raise TensorError("the body must be a JSON object with a 'text_input' string")
    unknown = set(body) - {"text_input", "parameters", "id"}
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError("'parameters' must be an object")
    unknown |= {f"parameters.{k}" for k in set(params) - _GENERATE_PARAMETERS}
    if unknown:
        raise TensorError(f"unknown field(s) {', '.join(sorted(unknown))} (parameters: "
                          f"{', '.join(sorted(_GENERATE_PARAMETERS))})")
    inputs: dict[str, np.ndarray] = {"text_input": np.array([[body["text_input"].encode("utf-8")]], dtype=np.object_)}
    for name, dtype, kinds in (("max_tokens", np.int32, (int,)), ("top_k", np.int32, (int,)),
                               ("seed", np.uint64, (int,)), ("temperature", np.float32, (int, float)),
                               ("top_p", np.float32, (int, float))):
        if name in params:
            v = params[name]
            integer = kinds == (int,)
            if isinstance(v, bool) or not isinstance(v, kinds) or (integer and not 0 <= v <= _LIMITS[dtype]):
                raise TensorError(f"parameters.{name} must be {'an integer in [0, ' + str(_LIMITS[dtype]) + ']' if integer else 'a number'}")
            inputs[name] = np.array([[v]], dtype=dtype)
    request_params = {k: params[k] for k in ("exclude_input_in_output",) if k in params}
    return inputs, request_params


def _binary_outputs(wanted: Optional[list[dict[str, Any]]], params: dict[str, Any]) -> Optional[set[str]]:
    """The outputs to send as binary (None: all of them), from `binary_data_output` and each
    requested output's `binary_data`."""
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise TensorError("parameters.binary_data_output must be a boolean")
    if not wanted:
        return None if default else set()
    out = set()
    for o in wanted:
        p = o.get("parameters") or {}
        if not isinstance(p, dict) or not isinstance(p.get("binary_data", default), bool):
            raise TensorError(f"output {o['name']!r}: parameters.binary_data must be a boolean")
        if set(p) - {"binary_data"}:
            raise TensorError(f"output {o['name']!r}: unknown parameter(s) {', '.join(sorted(set(p) - {'binary_data'}))}")
        if p.get("binary_data", default):
            out.add(o["name"])
    return out


def kserve_router(lookup: Callable[[str, Optional[str]], KServeServing], ready: Callable[[], bool],
                  index: Callable[[], list[dict[str, str]]]) -> APIRouter:
    """The /v2 routes; `lookup(name, version)` gives a model's front end or raises KServeError
    (404 unknown, 503 not ready), `ready()` whether the server is, `index()` the repository."""
    router = APIRouter()

    @router.get("/v2")
    async def server_metadata() -> JSONResponse:
        return JSONResponse({"name": "tokenmill", "version": _server_version(),
                             "extensions": ["binary_tensor_data", "generate"]})

    @router.get("/v2/health/live", response_class=Response, responses={200: _NO_BODY})
    async def live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready", response_class=Response,
                responses={200: _NO_BODY, 503: {"description": "Not ready", "content": {}}})
    async def server_ready() -> Response:
        return Response(status_code=200 if ready() else 503)

    @router.post("/v2/repository/index")
    async def repository_index() -> JSONResponse:
        return JSONResponse(index())

    async def model_metadata(name: str, version: Optional[str] = None) -> JSONResponse:
        try:
            kserve = lookup(name, version)
        except KServeError as e:
            return _error(e)
        return JSONResponse(kserve.metadata(name))

    async def model_ready(name: str, version: Optional[str] = None) -> Response:
        try:
            kserve = lookup(name, version)
        except KServeError as e:
            return _error(e)
        return Response(status_code=200 if kserve.ready else 503)

    async def infer(name: str, request: Request, version: Optional[str] = None) -> Response:
        access_log.note_model(name)
        try:
            kserve = lookup(name, version)
            body, inputs = parse_http_request(await request.body(),
                                              request.headers.get("inference-header-content-length"))
            wanted = body.get("outputs")
            if wanted is not None and (not isinstance(wanted, list) or not all(
                    isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted)):
                raise TensorError("'outputs' must be a list of objects with a 'name'")
            params = body.get("parameters") or {}
            if not isinstance(params, dict):
                raise TensorError("'parameters' must be an object")
            binary = _binary_outputs(wanted, params)
            outputs = await kserve.infer(inputs, [o["name"] for o in wanted] if wanted else None, request.headers,
                                         params, request.is_disconnected)
        except (KServeError, ValueError, EngineDeadError) as e:  # every refusal: the protocol's error body
            return _error(e)
        if binary is None:  # binary_data_output with no outputs named: all of them
            binary = set(outputs)
        content, header_len = http_response(name, kserve.version, body.get("id"), outputs, binary)
        if header_len is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    async def generate(name: str, request: Request, version: Optional[str] = None) -> Response:
        access_log.note_model(name)
        try:
            kserve = lookup(name, version)
            inputs, params = _generate_inputs(loads(await request.body()))
            outputs = await kserve.infer(inputs, None, request.headers, params, request.is_disconnected)
        except (KServeError, ValueError, EngineDeadError) as e:
            return _error(e)
        text = outputs["text_output"].reshape(-1)[0].decode("utf-8")
        return JSONResponse({"model_name": name, "model_version": kserve.version, "text_output": text})

    async def generate_stream(name: str, request: Request, version: Optional[str] = None) -> Response:
        access_log.note_model(name)
        try:
            kserve = lookup(name, version)
            inputs, params = _generate_inputs(loads(await request.body()))
            if params.get("exclude_input_in_output") is False:
                raise TensorError("generate_stream sends only new text: exclude_input_in_output cannot be false")
            stream = kserve.stream(inputs, None, request.headers, {"exclude_input_in_output": True})
            first = await anext(stream)
        except (KServeError, ValueError, EngineDeadError) as e:
            return _error(e)

        async def events():
            item: Optional[tuple[dict[str, np.ndarray], bool]] = first
            try:
                while item is not None:
                    tensors, _final = item
                    text = tensors["text_output"].reshape(-1)[0].decode("utf-8")
                    event = {"model_name": name, "model_version": kserve.version, "text_output": text}
                    yield f"data: {json.dumps(event)}\n\n"
                    item = await anext(stream, None)
            finally:
                await stream.aclose()  # a client that went away aborts its request

        return StreamingResponse(events(), media_type="text/event-stream")

    infer_ok = {"description": "Output tensors: JSON, or with binary outputs the JSON header (its length in "
                               "Inference-Header-Content-Length) followed by the tensors' bytes",
                "content": {"application/json": {}, "application/octet-stream": {}}}
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"], responses=_errors(404, 503))
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"], response_class=Response,
                             responses={200: _NO_BODY, **_errors(404, 503)})
        router.add_api_route(prefix + "/infer", infer, methods=["POST"], response_class=Response,
                             responses={200: infer_ok, **_errors(400, 401, 403, 404, 429, 503)})
        router.add_api_route(prefix + "/generate", generate, methods=["POST"],
                             responses=_errors(400, 401, 403, 404, 429, 503))
        router.add_api_route(prefix + "/generate_stream", generate_stream, methods=["POST"], response_class=Response,
                             responses={200: {"description": "Server-sent events", "content": {"text/event-stream": {}}},
                                        **_errors(400, 401, 403, 404, 429, 503)})
    return router
