"""One attempt at one replica: the request sent, the reply's head (and a stream's first event)
read, and everything closed exactly once however the attempt ends."""
from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from typing import Optional

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.router.replicas import Replica

REPLICA_HEADER = "x-tokenmill-replica"  # on every answer: which replica it came from
# Per-connection headers (RFC 9110 7.6.1) and those httpx sets itself. accept-encoding too: the
# router relays bytes as they come and would have to re-encode a compressed stream.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"})
_NOT_RELAYED = _HOP_BY_HOP | {"content-encoding", "date", "server"}  # httpx decoded it; uvicorn adds its own
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class AttemptFailed(Exception):
    """An attempt that failed before any byte reached the client: the next replica may take it."""

    def __init__(self, reason: str, message: str, retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.reason = reason  # one of metrics.RETRY_REASONS
        self.message = message
        self.retry_after = retry_after


def request_headers(request: Request) -> list[tuple[str, str]]:
    """The client's headers as the replica should see them. Authorization passes through: the
    replicas check the keys (and the signature policy needs user-agent and the rest)."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | {"x-forwarded-for"}]
    if request.client is not None:  # the client's address, after any proxies' in front of the router
        chain = [v for k, v in request.headers.items() if k.lower() == "x-forwarded-for"] + [request.client.host]
        headers.append(("x-forwarded-for", ", ".join(chain)))
    return headers


def retry_after(response: httpx.Response) -> Optional[int]:
    """The seconds in a Retry-After header (rounded up), or None when it has none that parses."""
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return max(0, math.ceil(seconds)) if math.isfinite(seconds) else None


async def sse_events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The reply's server-sent events, each whole (a read may end mid-event), as they arrive."""
    buf = b""
    async for data in response.aiter_bytes():
        buf += data
        start = 0
        for m in _EVENT_END.finditer(buf):
            yield buf[start:m.end()]
            start = m.end()
        buf = buf[start:]
    if buf.strip():
        yield buf


class Upstream:
    """One open attempt at one replica; counted in the replica's in-flight requests until closed."""

    def __init__(self, client: httpx.AsyncClient, replica: Replica) -> None:
        self.client = client
        self.replica = replica
        self.response: Optional[httpx.Response] = None
        self.body: Optional[bytes] = None  # a whole reply, read
        self.events: Optional[AsyncIterator[bytes]] = None  # or a stream ...
        self.first_event: Optional[bytes] = None  # ... whose first event is read
        self._closed = False
        replica.in_flight += 1

    async def open(self, method: str, path: str, content: Optional[bytes], headers: list[tuple[str, str]],
                   stream: bool) -> None:
        """Send the request and read the head of the reply. Raises AttemptFailed when another
        replica should be tried: no connection, a timeout, a 5xx, or a stream that breaks before
        its first event (so the client never sees a retried request)."""
        request = self.client.build_request(method, self.replica.url + path, content=content, headers=headers)
        try:
            self.response = response = await self.client.send(request, stream=True)
            status = response.status_code
            if status >= 500:
                await response.aread()
                if status == 503:  # at capacity (or not ready): healthy, but full
                    raise AttemptFailed("at_capacity", "HTTP 503", retry_after(response))
                raise AttemptFailed("server_error", f"HTTP {status}")
            if stream and status == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
                self.events = sse_events(response)
                try:
                    self.first_event = await self.events.__anext__()
                except StopAsyncIteration:
                    raise AttemptFailed("stream_start", "the stream ended before its first event") from None
            else:
                self.body = await response.aread()
        except httpx.TimeoutException as e:
            raise AttemptFailed("timeout", f"{type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:
            reason = "stream_start" if self.events is not None else "connect_error"
            raise AttemptFailed(reason, f"{type(e).__name__}: {e}") from None

    def response_headers(self) -> dict[str, str]:
        assert self.response is not None, "open() first"
        headers = {k: v for k, v in self.response.headers.items() if k.lower() not in _NOT_RELAYED}
        headers[REPLICA_HEADER] = self.replica.url
        return headers

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.replica.in_flight -= 1
        # Shielded: closing runs while the request is being cancelled (the client went away),
        # and an unfinished close would leave the replica generating for nobody.
        with anyio.CancelScope(shield=True):
            if self.events is not None:
                await self.events.aclose()  # type: ignore[attr-defined]
            if self.response is not None:
                await self.response.aclose()  # an unread stream closes its connection: the replica aborts


class RelayResponse(StreamingResponse):
    """A StreamingResponse that closes its upstream however the response ends, even when the
    body was never iterated (the client left before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], upstream: Upstream, headers: dict[str, str]) -> None:
        super().__init__(content, status_code=200, headers=headers, media_type="text/event-stream")
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.upstream.close()
