"""Inference requests of the open inference protocol, over HTTP or gRPC alike: validated by the
engine's rules, admitted by the same bouncer as the OpenAI routes, run as engine requests.

Errors are `KServeError`s carrying the HTTP status and the gRPC status code, so each front end
answers in its own protocol's terms (HTTP `{"error": "..."}`, gRPC INVALID_ARGUMENT, ...).
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Optional

import numpy as np

from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.outputs import RequestOutput
from tokenmill.server.kserve import interface
from tokenmill.server.kserve.tensors import TensorError
from tokenmill.server.openai import Job, OpenAIServing
from tokenmill.server.refusal import Refusal

_GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


class KServeError(Exception):
    def __init__(self, status: int, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    @property
    def grpc_code(self) -> str:
        return _GRPC_CODES.get(self.status, "INTERNAL")

    @classmethod
    def of(cls, e: Exception) -> "KServeError":
        """The protocol error for whatever refused a request."""
        if isinstance(e, KServeError):
            return e
        if isinstance(e, Refusal):
            return cls(e.status, e.message, e.retry_after)
        status = getattr(e, "status", 400)  # BadRequest carries 404 for an unknown model
        return cls(status, str(e))


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
        return self.openai.engine.is_serving

    def metadata(self, name: str) -> dict[str, Any]:
        inputs = [{"name": n, "datatype": d, "shape": s, "optional": not req}
                  for n, d, s, req in interface.FT_INPUTS + interface.TEXT_INPUTS]
        return {"name": name, "versions": [self.version], "platform": "tokenmill",
                "inputs": inputs, "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in interface.OUTPUTS]}

    def _rows(self, inputs: dict[str, np.ndarray], requested: Optional[list[str]]) -> tuple[str, list[interface.Row]]:
        kind = interface.interface_of(inputs)
        if kind == "ft":
            rows = interface.ft_rows(inputs, self.tokenizer, logprobs="output_log_probs" in (requested or []))
        else:
            rows = interface.text_rows(inputs, self.tokenizer)
        allowed = {"ft": {"output_ids", "sequence_length", "output_log_probs"}, "text": {"text_output"}}[kind]
        for name in requested or []:
            if name not in allowed:
                raise TensorError(f"unknown output {name!r} for these inputs (outputs: {', '.join(sorted(allowed))})")
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
            prompts = [self.tokenizer.decode(r.prompt_ids) for r in rows]
            out = interface.text_outputs(prompts, finals, bool(parameters.get("exclude_input_in_output", False)))
        if requested:
            out = {k: v for k, v in out.items() if k in requested}
        return out

    async def infer(self, inputs: dict[str, np.ndarray], requested: Optional[list[str]], headers: Mapping[str, str],
                    parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run every row to completion; the output tensors."""
        try:
            kind, rows = self._rows(inputs, requested)
            jobs = self._admit(rows, headers)
        except (TensorError, InvalidRequest, Refusal) as e:
            raise KServeError.of(e) from None
        finals: list[Optional[RequestOutput]] = [None] * len(jobs)
        async for i, out in self.openai._run_all(jobs):
            finals[i] = out
        return self._outputs(kind, rows, finals, requested, parameters)  # type: ignore[arg-type]

    async def stream(self, inputs: dict[str, np.ndarray], requested: Optional[list[str]], headers: Mapping[str, str],
                     parameters: Mapping[str, Any]) -> AsyncIterator[tuple[dict[str, np.ndarray], bool]]:
        """One response per engine step that produced tokens (decoupled streaming), each with that
        step's new tokens or text, the last flagged final. Streams take one row."""
        try:
            kind, rows = self._rows(inputs, requested)
            if len(rows) != 1:
                raise TensorError(f"a streaming request takes one row, got {len(rows)}")
            jobs = self._admit(rows, headers)
        except (TensorError, InvalidRequest, Refusal) as e:
            raise KServeError.of(e) from None
        sent_tokens, sent_text = 0, 0
        async for _, out in self.openai._run_all(jobs):
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
