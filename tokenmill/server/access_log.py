"""The request id and the access log.

Every HTTP response carries `x-request-id`: the client's own when it sent a usable one (1-128
printable ASCII characters, no spaces), else one made here. Every generation request (OpenAI
completions and chat, KServe infer, generate and generate_stream) gets one line on the
`tokenmill.access` logger when its response ends (a stream: after its last chunk, or when the
client goes away): request id, key id (never the key), route, status, prompt and output tokens,
time to first token and total time, finish reason or refusal reason and code. The prompt's text
only with `--log-prompts`.

The handlers fill the line's record through `current()` (a context variable: the stream's task
and the engine-output tasks of one request see the same record); middleware.py starts and ends
it. Framework-free, as access.py is.
"""
from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

access_logger = logging.getLogger("tokenmill.access")

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LEN = 128
_VALID_ID = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID_LEN)
GENERATION_ROUTES = re.compile(r"/v1/(chat/)?completions"
                               r"|/v2/models/[^/]+(/versions/[^/]+)?/(infer|generate|generate_stream)")


def request_id(header: Optional[str]) -> str:
    """The client's request id if it is usable (printable ASCII, no spaces, at most 128
    characters), else a fresh one."""
    return header if header is not None and _VALID_ID.fullmatch(header) else uuid.uuid4().hex


@dataclass
class AccessRecord:
    """What one request's access-log line says, filled in as the request goes."""

    request_id: str
    method: str
    route: str
    client: Optional[str] = None
    log_prompts: bool = False
    start: float = field(default_factory=time.monotonic)
    key_id: Optional[str] = None
    model: Optional[str] = None
    status: Optional[int] = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token: Optional[float] = None  # time.monotonic() of the first token of any choice
    finish_reasons: list[str] = field(default_factory=list)
    refusal: Optional[str] = None
    code: Optional[str] = None
    prompt: Any = None
    complete: bool = False  # the response's last byte went out

    def token_seen(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now

    def job_done(self, prompt_tokens: int, output_tokens: int, reasons: list[str]) -> None:
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        self.finish_reasons.extend(reasons)

    def refused(self, reason: str, code: Optional[str]) -> None:
        self.refusal, self.code = reason, code

    def fields(self, now: float) -> dict[str, Any]:
        reasons = sorted(set(self.finish_reasons))
        refusal = self.refusal
        if refusal is None and self.status is not None and self.status >= 400:
            refusal = "error"
        out = {"request_id": self.request_id, "key_id": self.key_id, "method": self.method, "route": self.route,
               "status": self.status, "model": self.model, "client": self.client,
               "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
               "ttft_ms": round((self.first_token - self.start) * 1e3, 1) if self.first_token is not None else None,
               "total_ms": round((now - self.start) * 1e3, 1),
               "finish_reason": ",".join(reasons) if reasons else None,
               "refusal": refusal, "code": self.code, "complete": self.complete}
        if self.log_prompts and self.prompt is not None:
            out["prompt"] = self.prompt
        return out


_current: contextvars.ContextVar[Optional[AccessRecord]] = contextvars.ContextVar("tokenmill_access", default=None)


def current() -> Optional[AccessRecord]:
    """The access record of the HTTP request being served, if any (None over gRPC)."""
    return _current.get()


def note_model(name: str) -> None:
    rec = _current.get()
    if rec is not None:
        rec.model = name


def note_refusal(reason: str, code: Optional[str]) -> None:
    rec = _current.get()
    if rec is not None:
        rec.refused(reason, code)


def start(record: AccessRecord) -> contextvars.Token:
    return _current.set(record)


def end(token: contextvars.Token) -> None:
    _current.reset(token)


def emit(record: AccessRecord) -> None:
    """The request's access-log line (in JSON, its fields are keys; the message just the summary)."""
    fields = record.fields(time.monotonic())
    summary = f"{record.method} {record.route} {record.status}"
    access_logger.info(text(fields), extra={**fields, "_json_message": summary})


def text(fields: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, str) and v and not any(c.isspace() or c in '"=' for c in v):
            return v
        return json.dumps(v, ensure_ascii=False)

    return " ".join(f"{k}={show(v)}" for k, v in fields.items())
