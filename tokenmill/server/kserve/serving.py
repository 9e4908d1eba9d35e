"""Inference requests of the open inference protocol, over HTTP or gRPC alike: validated by the
engine's rules, admitted by the same bouncer as the OpenAI routes, run as engine requests.

Errors are `KServeError`s carrying the HTTP status and the gRPC status code, so each front end
answers in its own protocol's terms (HTTP `{"error": "..."}`, gRPC INVALID_ARGUMENT, ...).
"""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Optional

import numpy as np

from tokenmill.engine.async_engine import EngineDeadError
from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.outputs import RequestOutput
from tokenmill.server.kserve import interface
from tokenmill.server.kserve.tensors import TensorError
from tokenmill.server.openai import Job, OpenAIServing
from tokenmill.server.refusal import Refusal

# Request-level parameters honoured: the outputs' encoding, whether text_output repeats the prompt,
# and tritonclient's request for a final-flagged stream response (the last response always is).
_PARAMETERS = {"binary_data_output", "exclude_input_in_output", "triton_enable_empty_final_response"}
_GRPC_CODES = {499: "CANCELLED", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


class KServeError(Exception):
    def __init__(self, status: int, message: str, retry_after: Optional[float] = None,
                 reason: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        # What refused the request and its code, as the OpenAI routes say them (the access log).
        self.reason = reason or ("bad_request" if 400 <= status < 500 and status not in (401, 403, 429, 499)
                                 else None)
        self.code = code

    @property
    def grpc_code(self) -> str:
        return _GRPC_CODES.get(self.status, "INTERNAL")

    @classmethod
    def of(cls, e: Exception) -> "KServeError":
        """The protocol error for whatever refused a request."""
        if isinstance(e, KServeError):
            return e
        if isinstance(e, Refusal):
            return cls(e.status, e.message, e.retry_after, e.reason, e.code)
        if isinstance(e, EngineDeadError):
            return cls(503, str(e), reason="engine_unavailable", code="engine_unavailable")
        status = getattr(e, "status", 400)  # BadRequest carries 404 for an unknown model
        return cls(status, str(e), code=getattr(e, "code", None))


class KServeServing:
    def __init__(self, openai: OpenAIServing, model_names: list[str], version: str = "1") -> None:
        self.openai = openai
        self.version = version  # the one version served (a repository's highest allowed)
        self.admission = openai.admission
        self.tokenizer = openai.tokenizer
        self.model_names = model_names
        self.end_id = min(openai.engine.engine.eos_token_ids, default=0)

    def check_model(self, name: str, version: Optional[str]) -> None:
        if name not in self.model_names:
            raise KServeError(404, f"unknown model {name!r}; this server serves {', '.join(self.model_names)}")
        if version not in (None, "", self.version):
            raise KServeError(404, f"model {name!r} has no version {version!r} (it has {self.version})")

    @property
    def ready(self) -> bool:
        return self.openai.engine.is_serving and not self.openai.lifecycle.draining

    def _begin(self) -> None:
        try:
            self.openai.begin(self.model_names[0])
        except Refusal as e:
            raise KServeError.of(e) from None

    def metadata(self, name: str) -> dict[str, Any]:
        inputs = [{"name": n, "datatype": d, "shape": s, "optional": not req}
                  for n, d, s, req in interface.FT_INPUTS + interface.TEXT_INPUTS]
        return {"name": name, "versions": [self.version], "platform": "tokenmill",
                "inputs": inputs, "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in interface.OUTPUTS]}

    def _rows(self, inputs: dict[str, np.ndarray], requested: Optional[list[str]],
              parameters: Mapping[str, Any]) -> tuple[str, list[interface.Row]]:
        kind = interface.interface_of(inputs)
        for key, value in parameters.items():  # request-level parameters: nothing is ignored silently
            if key not in _PARAMETERS:
                raise TensorError(f"unknown request parameter {key!r} (known: {', '.join(sorted(_PARAMETERS))})")
            if not isinstance(value, bool):
                raise TensorError(f"request parameter {key!r} must be a boolean, got {value!r}")
        if kind == "ft" and "exclude_input_in_output" in parameters:
            raise TensorError("exclude_input_in_output applies to text_input; output_ids always hold the prompt")
        if kind == "ft":
            rows = interface.ft_rows(inputs, self.tokenizer, logprobs="output_log_probs" in (requested or []))
        else:
            rows = interface.text_rows(inputs, self.tokenizer)
        allowed = {"ft": {"output_ids", "sequence_length", "output_log_probs"}, "text": {"text_output"}}[kind]
        for name in requested or []:
            if name not in allowed:
                raise TensorError(f"unknown output {name!r} for these inputs (outputs: {', '.join(sorted(allowed))})")
        limit = self.admission.limits.max_num_queued_reqs
        if len(rows) > limit:  # it could never be admitted: a 400, not a 503 to retry forever
            raise TensorError(f"the batch has {len(rows)} rows; this server takes at most {limit} requests at once")
        max_param = "request_output_len" if kind == "ft" else "max_tokens"
        for row in rows:
            self.admission.validator.check(row.prompt_ids, row.params, max_tokens_must_fit=True,
                                           prompt_param="input_ids" if kind == "ft" else "text_input",
                                           max_tokens_param=max_param)
        return kind, rows

    def _admit(self, rows: list[interface.Row], headers: Mapping[str, str]) -> list[Job]:
        jobs = [Job(f"kserve-{uuid.uuid4().hex}", r.prompt_ids, r.params, i) for i, r in enumerate(rows)]
        self.admission.admit(headers, jobs)
        return jobs

    def _outputs(self, kind: str, rows: list[interface.Row], finals: list[RequestOutput], requested: Optional[list[str]],
                 parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if kind == "ft":
            out = interface.ft_outputs(rows, finals, self.end_id)
        else:
            out = interface.text_outputs(rows, finals, bool(parameters.get("exclude_input_in_output", False)))
        if requested:
            out = {k: v for k, v in out.items() if k in requested}
        return out

    def _refuse(self, e: Exception) -> KServeError:
        if isinstance(e, (TensorError, InvalidRequest)):
            self.admission.metrics.reject("bad_request")  # refusals by access or capacity count themselves
        return KServeError.of(e)

    async def infer(self, inputs: dict[str, np.ndarray], requested: Optional[list[str]], headers: Mapping[str, str],
                    parameters: Mapping[str, Any],
                    disconnected: Optional[Callable[[], Awaitable[bool]]] = None) -> dict[str, np.ndarray]:
        """Run every row to completion; the output tensors. A client that goes away (as
        `disconnected` tells) aborts every row at once, and their KV blocks go back to the pool."""
        self._begin()
        try:
            kind, rows = self._rows(inputs, requested, parameters)
            jobs = self._admit(rows, headers)
        except (TensorError, InvalidRequest, Refusal) as e:
            raise self._refuse(e) from None
        finals: list[Optional[RequestOutput]] = [None] * len(jobs)
        try:
            async with contextlib.aclosing(self.openai.run_all(jobs)) as outputs:
                async for i, out in outputs:
                    finals[i] = out
                    if disconnected is not None and await disconnected():
                        raise KServeError(499, "the client disconnected")
        except EngineDeadError as e:
            raise KServeError.of(e) from None
        return self._outputs(kind, rows, finals, requested, parameters)  # type: ignore[arg-type]

    async def stream(self, inputs: dict[str, np.ndarray], requested: Optional[list[str]], headers: Mapping[str, str],
                     parameters: Mapping[str, Any]) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        """One response per engine step that produced tokens (decoupled streaming), each with that
        step's new tokens or text, the last flagged final. Streams take one row."""
        self._begin()
        try:
            kind, rows = self._rows(inputs, requested, parameters)
            if len(rows) != 1:
                raise TensorError(f"a streaming request takes one row, got {len(rows)}")
            if "output_log_probs" in (requested or []):
                raise TensorError("output_log_probs is not streamed; ask for it in a non-streaming request")
            jobs = self._admit(rows, headers)
        except (TensorError, InvalidRequest, Refusal) as e:
            raise self._refuse(e) from None
        async with contextlib.aclosing(self.openai.run_all(jobs)) as outputs:
            async for item in self._deltas(kind, requested, outputs):
                yield item

    async def _deltas(self, kind: str, requested: Optional[list[str]],
                      outputs: AsyncIterator[tuple[int, RequestOutput]]
                      ) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        sent_tokens, sent_text = 0, 0
        async for _, out in outputs:
            c = out.outputs[0]
            new_ids, new_text = list(c.token_ids[sent_tokens:]), c.text[sent_text:]
            sent_tokens, sent_text = len(c.token_ids), len(c.text)
            if not new_ids and not out.finished:
                continue
            if kind == "ft":
                tensors = {"output_ids": np.array([[new_ids]], dtype=np.uint32).reshape(1, 1, -1),
                           "sequence_length": np.array([[len(new_ids)]], dtype=np.uint32)}
            else:
                tensors = {"text_output": np.array([[new_text.encode("utf-8")]], dtype=np.object_)}
            yield ({k: v for k, v in tensors.items() if not requested or k in requested}), out.finished
