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
from pydantic import BaseModel
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.server.kserve.serving import KServeError, KServeServing
from tokenmill.server.kserve.tensors import TensorError, http_response, parse_http_request

class KServeErrorResponse(BaseModel):
    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "The request is malformed (the message names the problem).", 401: "Missing or unknown API key.",
            403: "The request does not match the required client signature.",
            404: "Unknown model or version.", 429: "A rate limit of this API key is spent.",
            503: "The model is not ready, or the server is at capacity."}
    return {s: {"model": KServeErrorResponse, "description": what[s]} for s in statuses}


_NO_BODY = {"description": "OK (no body)", "content": {}}
_GENERATE_PARAMETERS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "exclude_input_in_output"}


def _error(e: Exception) -> JSONResponse:
    err = KServeError.of(e)
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
            if isinstance(v, bool) or not isinstance(v, kinds) or (dtype in (np.int32, np.uint64) and v < 0):
                raise TensorError(f"parameters.{name} must be a {'non-negative integer' if kinds == (int,) else 'number'}")
            inputs[name] = np.array([[v]], dtype=dtype)
    return inputs, params


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
        try:
            kserve = lookup(name, version)
            body, inputs = parse_http_request(await request.body(),
                                              request.headers.get("inference-header-content-length"))
            wanted = body.get("outputs")
            if wanted is not None and (not isinstance(wanted, list) or not all(
                    isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted)):
                raise TensorError("'outputs' must be a list of objects with a 'name'")
            params = body.get("parameters") or {}
            outputs = await kserve.infer(inputs, [o["name"] for o in wanted] if wanted else None, request.headers,
                                         params)
        except (KServeError, ValueError) as e:  # every refusal becomes the protocol's error body
            return _error(e)
        all_binary = bool(params.get("binary_data_output", False))
        binary = {o["name"] for o in wanted or [] if (o.get("parameters") or {}).get("binary_data", all_binary)}
        if not wanted and all_binary:
            binary = set(outputs)
        content, header_len = http_response(name, kserve.version, body.get("id"), outputs, binary)
        if header_len is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    async def generate(name: str, request: Request, version: Optional[str] = None) -> Response:
        try:
            kserve = lookup(name, version)
            inputs, params = _generate_inputs(json.loads(await request.body()))
            outputs = await kserve.infer(inputs, None, request.headers, params)
        except json.JSONDecodeError as e:
            return _error(TensorError(f"the request is not valid JSON: {e}"))
        except (KServeError, ValueError) as e:
            return _error(e)
        text = outputs["text_output"].reshape(-1)[0].decode("utf-8")
        return JSONResponse({"model_name": name, "model_version": kserve.version, "text_output": text})

    async def generate_stream(name: str, request: Request, version: Optional[str] = None) -> Response:
        try:
            kserve = lookup(name, version)
            inputs, params = _generate_inputs(json.loads(await request.body()))
            params = {**params, "exclude_input_in_output": True}  # a stream sends what is new
            stream = kserve.stream(inputs, None, request.headers, params)
            first = await anext(stream)
        except json.JSONDecodeError as e:
            return _error(TensorError(f"the request is not valid JSON: {e}"))
        except (KServeError, ValueError) as e:
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
