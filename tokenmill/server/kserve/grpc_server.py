"""The open inference protocol over gRPC: `inference.GRPCInferenceService`, as Triton serves it
(ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, ModelStreamInfer
with one response per generated step, the last flagged `triton_final_response`, and
RepositoryIndex).

The service's other RPCs (ModelConfig, ModelStatistics, repository load/unload, shared memory,
trace and log settings) are not served: they fall through to the generated base class in
protos/grpc_service_pb2_grpc.py, whose `raise NotImplementedError` after setting the status is
how grpc answers UNIMPLEMENTED, which is what a client should hear for them.

Each ModelInfer, and each request on a ModelStreamInfer stream, gets an access-log line as an
HTTP generation request does (access_log.py): method "gRPC", the RPC as its route, the status as
its HTTP equivalent (200, 400, 503, ...). Its request id is the request's `id` field when usable
(else its `x-request-id` metadata, else a fresh one); ModelInfer also returns it as `x-request-id`
initial metadata. A refusal with a Retry-After (at capacity, a rate limit, shutting down) carries
it as `retry-after` trailing metadata, or, on a stream, as the error response's `retry_after`
parameter.

It runs on the HTTP server's event loop (started and stopped with the app), so both front ends
share one engine, one bouncer and one set of metrics. Stubs: tokenmill/server/kserve/protos
(scripts/gen_protos.sh).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable, Optional

import grpc
import numpy as np

from tokenmill.engine.async_engine import EngineDeadError
from tokenmill.server import access_log
from tokenmill.server.access_log import REQUEST_ID_HEADER, AccessRecord
from tokenmill.server.kserve.http import _server_version
from tokenmill.server.kserve.protos import grpc_service_pb2 as pb
from tokenmill.server.kserve.protos import grpc_service_pb2_grpc as pb_grpc
from tokenmill.server.kserve.serving import KServeError, KServeServing
from tokenmill.server.kserve.tensors import TensorError, datatype_of, from_bytes, from_json, to_bytes

logger = logging.getLogger(__name__)

# Typed contents (when a client sends no raw bytes) by datatype.
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _parameter(p: Any) -> Any:
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def _inputs(request: Any) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name in out:
            raise TensorError(f"input {t.name!r} is given twice")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise TensorError(f"input {t.name!r}: shape must be non-negative, got {list(shape)}")
        if raw:
            out[t.name] = from_bytes(t.name, t.datatype, shape, raw[i])
            continue
        field = _CONTENTS.get(t.datatype)
        if field is None:
            raise TensorError(f"input {t.name!r}: datatype {t.datatype!r} cannot be sent as typed contents")
        values = list(getattr(t.contents, field))
        if t.datatype == "BYTES":
            values = [v.decode("utf-8", errors="strict") for v in values]
        out[t.name] = from_json(t.name, t.datatype, shape, values)
    return out


def _response(model: str, version: str, request_id: str, outputs: dict[str, np.ndarray],
              final: Optional[bool] = None) -> Any:
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, array in outputs.items():
        resp.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        resp.raw_output_contents.append(to_bytes(array))
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


_SERVICE = "/inference.GRPCInferenceService/"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, lookup: Callable[[str, Optional[str]], KServeServing], ready: Callable[[], bool],
                 index: Callable[[], list[dict[str, str]]], log_prompts: bool = False) -> None:
        self.lookup, self.ready, self.index = lookup, ready, index
        self.log_prompts = log_prompts

    @contextlib.contextmanager
    def _access(self, rpc: str, request: Any, context: Any) -> Iterator[AccessRecord]:
        """The access-log line of one inference request: the record the serving code fills in
        (through access_log.current(), as over HTTP), written when the request ends."""
        metadata = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rid = access_log.request_id(request.id or metadata.get(REQUEST_ID_HEADER))
        record = AccessRecord(rid, "gRPC", _SERVICE + rpc, client=context.peer(), log_prompts=self.log_prompts)
        record.model = request.model_name
        token = access_log.start(record)
        try:
            yield record
            record.status, record.complete = record.status or 200, True
        except (KServeError, ValueError, EngineDeadError) as e:
            err = KServeError.of(e)
            record.status = err.status
            record.refused(err.reason or "error", err.code or err.grpc_code)
            raise
        except BaseException:  # the client went away (cancelled), or a fault
            record.status = record.status or 499
            raise
        finally:
            access_log.end(token)
            access_log.emit(record)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        resp = pb.RepositoryIndexResponse()
        for m in self.index():
            if not request.ready or m["state"] == "READY":
                resp.models.add(name=m["name"], version=m["version"], state=m["state"], reason=m.get("reason", ""))
        return resp

    async def _abort(self, context: Any, e: Exception) -> None:
        err = KServeError.of(e)
        # A refusal's Retry-After (at capacity, a rate limit, shutting down), as HTTP sends it.
        metadata = (("retry-after", str(max(1, math.ceil(err.retry_after)))),) if err.retry_after else ()
        await context.abort(getattr(grpc.StatusCode, err.grpc_code), err.message, trailing_metadata=metadata)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            kserve = self.lookup(request.name, request.version)
        except KServeError as e:
            if e.status != 503:  # unknown model or version; a model that failed to load is just not ready
                await self._abort(context, e)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=kserve.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="tokenmill", version=_server_version(),
                                         extensions=["binary_tensor_data", "generate"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            md = self.lookup(request.name, request.version).metadata(request.name)
        except KServeError as e:
            await self._abort(context, e)
        resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for t in md["inputs"]:
            resp.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        for t in md["outputs"]:
            resp.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    def _parse(self, request: Any, context: Any) -> tuple[KServeServing, dict[str, np.ndarray], Optional[list[str]],
                                                           dict, dict]:
        kserve = self.lookup(request.model_name, request.model_version)
        inputs = _inputs(request)
        wanted = [o.name for o in request.outputs] or None
        params = {k: _parameter(v) for k, v in request.parameters.items()}
        headers = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        return kserve, inputs, wanted, params, headers

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            with self._access("ModelInfer", request, context) as record:
                await context.send_initial_metadata(((REQUEST_ID_HEADER, record.request_id),))
                kserve, inputs, wanted, params, headers = self._parse(request, context)
                outputs = await kserve.infer(inputs, wanted, headers, params)
        except (KServeError, ValueError, EngineDeadError) as e:
            await self._abort(context, e)
        return _response(request.model_name, kserve.version, request.id, outputs)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        # Requests on one stream run concurrently, as on Triton's decoupled streams: each is its
        # own task, and their responses are interleaved as they come. A bad request is answered
        # in the stream (error_message, with its id), which stays open for the next.
        responses: asyncio.Queue = asyncio.Queue()
        done = object()

        async def serve(request: Any) -> None:
            try:
                with self._access("ModelStreamInfer", request, context):
                    kserve, inputs, wanted, params, headers = self._parse(request, context)
                    async with contextlib.aclosing(kserve.stream(inputs, wanted, headers, params)) as stream:
                        async for tensors, final in stream:
                            response = _response(request.model_name, kserve.version, request.id, tensors, final)
                            responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except (KServeError, ValueError, EngineDeadError) as e:
                err = KServeError.of(e)
                response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                if err.retry_after:  # the stream stays open: the hint goes in the response's parameters
                    response.parameters["retry_after"].int64_param = max(1, math.ceil(err.retry_after))
                responses.put_nowait(pb.ModelStreamInferResponse(error_message=err.message, infer_response=response))

        tasks: list[asyncio.Task] = []

        async def read() -> None:
            try:
                async for request in request_iterator:
                    tasks.append(asyncio.create_task(serve(request)))
                await asyncio.gather(*tasks)
            finally:
                responses.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while (item := await responses.get()) is not done:
                yield item
        finally:  # the client closed the stream: every request still running is aborted
            for task in [reader, *tasks]:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)


async def start_grpc_server(lookup: Callable[[str, Optional[str]], KServeServing], ready: Callable[[], bool],
                            index: Callable[[], list[dict[str, str]]], host: str, port: int,
                            log_prompts: bool = False) -> Any:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(lookup, ready, index, log_prompts), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    logger.info("gRPC inference service on %s:%d", host, port)
    return server
