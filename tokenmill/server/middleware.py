"""The HTTP server's outermost layer (inside Starlette's error middleware): the request id on
every response, the access-log line of every generation request (access_log.py), the count of
those in flight for a graceful shutdown (lifecycle.py), and a 500 with the OpenAI error body for
an exception nothing else handled."""
from __future__ import annotations

import logging
from typing import Optional

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server import access_log
from tokenmill.server.access_log import GENERATION_ROUTES, REQUEST_ID_HEADER, AccessRecord, request_id
from tokenmill.server.errors import error_body
from tokenmill.server.lifecycle import Lifecycle

logger = logging.getLogger(__name__)


class AccessLogMiddleware:
    """Pure ASGI (a stream's end is seen, which BaseHTTPMiddleware hides): the request id on every
    response, the access-log line of every generation request, the count of those in flight (for
    the shutdown), and a 500 with the OpenAI error body for an exception nothing handled."""

    def __init__(self, app: ASGIApp, lifecycle: Optional[Lifecycle] = None, log_prompts: bool = False) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        path = scope.get("path", "")
        generation = scope.get("method") == "POST" and GENERATION_ROUTES.fullmatch(path) is not None
        client = scope.get("client")
        record = AccessRecord(rid, scope.get("method", ""), path, client=client[0] if client else None,
                              log_prompts=self.log_prompts)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, rid)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record.complete = True
            await send(message)

        token = access_log.start(record)
        life = self.lifecycle if generation else None
        if life is not None:
            life.requests += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # the status line went out: all that is left is to cut the connection
                raise
            logger.exception("request %s failed", rid)
            record.refused("error", "internal_error")
            await JSONResponse(error_body("internal server error", 500, code="internal_error"),
                               status_code=500)(scope, receive, send_with_id)
        finally:
            access_log.end(token)
            if life is not None:
                life.requests -= 1
            if generation:
                access_log.emit(record)
