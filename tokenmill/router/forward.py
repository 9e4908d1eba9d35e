"""One request's way through the fleet: the policy orders the replicas, each is tried in turn
until one answers, and the answer (JSON or a stream of server-sent events) goes back as it comes."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Optional, TypeVar

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.router.config import RouterConfig
from tokenmill.router.metrics import RouterMetrics
from tokenmill.router.policy import Policy
from tokenmill.router.prompt_text import CHAT_PATH, ReplyCollector, answered_text, request_text
from tokenmill.router.replicas import Replica, ReplicaSet
from tokenmill.router.upstream import AttemptFailed, RelayResponse, Upstream, request_headers
from tokenmill.server.api_keys import KeyStore
from tokenmill.server.errors import error_body
from tokenmill.server.refusal import Refusal

logger = logging.getLogger(__name__)

REGION_HEADER = "x-tokenmill-region"
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected while the router waited on a replica."""


class ReplicaLost(Exception):
    """The replica failed its health checks while the router waited on it."""


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _race(work: Awaitable[T], replica: Replica, request: Optional[Request] = None) -> T:
    """`work`, given up when the replica is found down while it runs (ReplicaLost: a hung
    replica would otherwise hold the request for the whole upstream timeout), or when the client
    goes away (ClientGone: a non-streamed reply arrives whole at the end, so without this a
    replica would generate it for nobody)."""
    task = asyncio.ensure_future(work)
    lost = asyncio.ensure_future(replica.lost.wait())
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    waiters = {task, lost} | ({gone} if gone is not None else set())
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (lost, gone):
            if waiter is not None:
                waiter.cancel()
        if not task.done():
            task.cancel()
            # Shielded: when this runs because the request itself is being cancelled (the client
            # left mid-stream), the wait must still see `work` end, or closing the stream it
            # reads would find it running and fail, leaving the replica generating for nobody.
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
    if task in done:
        return task.result()
    if lost in done:
        raise ReplicaLost
    raise ClientGone


def _error(status: int, message: str, code: str, retry_after: Optional[int] = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(message, status, code=code), status_code=status, headers=headers)


class Forwarder:
    def __init__(self, config: RouterConfig, fleet: ReplicaSet, policy: Policy, metrics: RouterMetrics,
                 client: httpx.AsyncClient, keys: Optional[KeyStore] = None) -> None:
        self.config = config
        self.keys = keys or KeyStore()
        self.fleet = fleet
        self.policy = policy
        self.metrics = metrics
        self.client = client

    def refused(self, request: Request) -> Optional[Response]:
        """The 401 for a request whose key the router's keys file does not hold, or None. The
        Authorization header goes on to the replica, which applies that key's quotas."""
        try:
            self.keys.authenticate(request.headers.get("authorization"))
        except Refusal as r:
            self.metrics.refusals.labels("auth").inc()
            return JSONResponse(r.to_openai_body(), status_code=r.status)
        return None

    async def generate(self, request: Request, path: str) -> Response:
        """POST /v1/completions or /v1/chat/completions, relayed to the first replica that takes it."""
        if (refusal := self.refused(request)) is not None:
            return refusal
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.metrics.refusals.labels("bad_request").inc()
            return _error(400, "the request body must be a JSON object", "invalid_json")
        stream, chat = body.get("stream") is True, path == CHAT_PATH
        prompt = request_text(path, body)
        region = request.headers.get(REGION_HEADER) or self.config.region
        route = self.policy.route(self.fleet.replicas, prompt, region)
        if not route.candidates:
            self.metrics.refusals.labels("no_healthy_replica").inc()
            return _error(503, "no replica is healthy; retry later", "no_healthy_replica", self.config.retry_after_s)
        headers = request_headers(request)
        waits: list[int] = []
        last_failure = ""
        for i, replica in enumerate(route.candidates):
            up = Upstream(self.client, replica)
            try:
                await _race(up.open("POST", path, raw, headers, stream), replica, request)
            except ReplicaLost:
                await up.close()
                self.metrics.retries.labels(replica.url, "replica_lost").inc()
                last_failure = f"{replica.url}: {replica.last_error}"
                logger.info("%s: %s failed its health check while answering; trying the next replica", path,
                            replica.url)
                continue
            except AttemptFailed as f:
                await up.close()
                self.metrics.retries.labels(replica.url, f.reason).inc()
                logger.info("%s on %s: %s; trying the next replica", path, replica.url, f.message)
                if f.reason == "at_capacity":
                    waits.append(f.retry_after if f.retry_after is not None else self.config.retry_after_s)
                else:
                    self.fleet.mark_failed(replica, f.message)
                    last_failure = f"{replica.url}: {f.message}"
                continue
            except ClientGone:
                await up.close()
                logger.info("client went away waiting on %s", replica.url)
                return Response(status_code=499)
            except BaseException:
                await up.close()
                raise
            # An answer, handed back as it is: a 4xx too. NOTE: 401/403/429 are never retried on
            # another replica: the replicas share the keys, quotas and signature policy, so the
            # next would refuse the same way, and trying would spend the client's quota N times.
            assert up.response is not None
            self.metrics.requests.labels(replica.url).inc()
            if route.affinity and i == 0:
                self.metrics.affinity_hits.labels(replica.url).inc()
            ok = up.response.status_code < 300
            if ok:  # recorded now, so a concurrent request with this prefix follows it here
                self.policy.served(prompt, replica)
            if up.events is not None:
                return RelayResponse(self._relay(up, path, body, prompt, chat), up, up.response_headers())
            await up.close()
            if ok:
                self._learn_json(up.body or b"", path, body, prompt, chat, up)
            return Response(up.body or b"", status_code=up.response.status_code, headers=up.response_headers())
        if waits:
            wait = min(waits)
            self.metrics.refusals.labels("at_capacity").inc()
            return _error(503, f"every replica is at capacity; retry after {wait} s", "fleet_at_capacity", wait)
        self.metrics.refusals.labels("replicas_failed").inc()
        return _error(503, f"no replica could serve the request (last: {last_failure})", "replicas_unavailable",
                      self.config.retry_after_s)

    def _learn_json(self, raw: bytes, path: str, body: dict[str, Any], prompt: str, chat: bool,
                    up: Upstream) -> None:
        collector = ReplyCollector(chat)
        with contextlib.suppress(ValueError):
            collector.feed_json(json.loads(raw))
        text = answered_text(path, body, prompt, collector.text)
        if text is not None:
            self.policy.served(text, up.replica)

    async def _relay(self, up: Upstream, path: str, body: dict[str, Any], prompt: str,
                     chat: bool) -> AsyncIterator[bytes]:
        """The replica's events as they arrive. A replica that fails mid-stream (the client has
        part of the reply, so it cannot be retried) ends the stream with an error event and
        [DONE], as the server's own streamed errors do, so no client waits for an end that
        never comes."""
        assert up.events is not None and up.first_event is not None
        collector = ReplyCollector(chat)
        failure = None
        try:
            event: Optional[bytes] = up.first_event
            while event is not None:
                collector.feed_event(event)
                yield event
                event = await _race(anext(up.events, None), up.replica)
            if not collector.done:
                failure = "the replica ended the stream without [DONE]"
        except httpx.HTTPError as e:
            failure = f"{type(e).__name__}: {e}"
            self.fleet.mark_failed(up.replica, f"mid-stream: {failure}")
        except ReplicaLost:
            failure = f"the replica failed its health check ({up.replica.last_error})"
        finally:
            await up.close()
        if failure is not None:
            logger.warning("stream from %s broke off: %s", up.replica.url, failure)
            self.metrics.stream_failures.labels(up.replica.url).inc()
            err = error_body(f"the replica failed mid-stream: {failure}", 500, code="replica_failed")
            yield f"data: {json.dumps(err)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            return
        text = answered_text(path, body, prompt, collector.text)
        if text is not None:
            self.policy.served(text, up.replica)

    async def models(self, request: Request) -> Response:
        """GET /v1/models from the least-loaded healthy replica (they serve the same models)."""
        if (refusal := self.refused(request)) is not None:
            return refusal
        headers = request_headers(request)
        for replica in sorted(self.fleet.healthy(), key=lambda r: r.load):
            up = Upstream(self.client, replica)
            try:
                await up.open("GET", "/v1/models", None, headers, stream=False)
            except AttemptFailed as f:
                if f.reason != "at_capacity":
                    self.fleet.mark_failed(replica, f.message)
                continue
            finally:
                await up.close()
            assert up.response is not None
            return Response(up.body or b"", status_code=up.response.status_code, headers=up.response_headers())
        self.metrics.refusals.labels("no_healthy_replica").inc()
        return _error(503, "no replica is healthy; retry later", "no_healthy_replica", self.config.retry_after_s)
