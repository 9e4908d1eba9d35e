"""Graceful shutdown. The first SIGTERM (or SIGINT) puts the server in draining: new generation
requests get 503 "shutting down" (over HTTP and gRPC), `/health` answers 503 so a router or a
Kubernetes Service stops sending, and the requests in flight keep running for up to
`--shutdown-timeout` seconds. Those still running then are aborted: each ends at once with
finish_reason "abort" (a stream gets its last chunk and `[DONE]`) and its KV blocks go back to
the pool. Then the listeners close, the engines stop and the process exits 0. A second signal
exits at once.

uvicorn's own handling would close the listening socket at the first signal (new requests would
be refused, not answered) and re-raise the signal at the end (exit status 143, not 0): `Server`
here keeps the socket open while draining and returns normally.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Generator
from types import FrameType
from typing import Any, Callable, Optional

import uvicorn

from tokenmill.server.refusal import Refusal

logger = logging.getLogger("tokenmill.server")

SHUTTING_DOWN = "the server is shutting down; send the request to another replica"
ABORTED = object()  # what `next_or_abort` returns once the shutdown timeout has passed


class Lifecycle:
    """Whether the server is draining, and what is still in flight. Lives on the event loop."""

    def __init__(self) -> None:
        self.draining = False
        self.jobs = 0  # engine requests running for clients (OpenAI and KServe, HTTP and gRPC)
        self.requests = 0  # generation HTTP requests whose response has not ended
        self._aborting: Optional[asyncio.Event] = None

    @property
    def in_flight(self) -> int:
        return max(self.jobs, self.requests)

    def check_open(self) -> None:
        """Raise the 503 a new generation request gets while the server drains."""
        if self.draining:
            raise Refusal(503, "shutting_down", SHUTTING_DOWN, "shutting_down", retry_after=1.0)

    def _event(self) -> asyncio.Event:
        if self._aborting is None:
            self._aborting = asyncio.Event()
        return self._aborting

    @property
    def aborting(self) -> bool:
        return self._aborting is not None and self._aborting.is_set()

    def abort_all(self) -> None:
        """End every request in flight now (each with finish_reason "abort")."""
        self._event().set()

    async def next_or_abort(self, outputs: AsyncIterator[Any]) -> Any:
        """The next item of `outputs`, or ABORTED once abort_all() is called. Only used while
        draining: a waiter task per item is a cost a serving server should not pay."""
        event = self._event()
        if event.is_set():
            return ABORTED
        nxt = asyncio.ensure_future(anext(outputs))
        stop = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not nxt.done():  # aborted (or our caller cancelled): the stream closes, the engine aborts
                nxt.cancel()
                await asyncio.wait({nxt})
        if nxt.cancelled():
            return ABORTED
        return nxt.result()  # raises StopAsyncIteration at the end, as anext does

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight, at most `timeout` seconds; whether it got there."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight


class Server(uvicorn.Server):
    """uvicorn's server with tokenmill's shutdown: drain first, then stop (see the module doc)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout: float,
                 on_started: Optional[Callable[[], None]] = None) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.shutdown_timeout = shutdown_timeout
        self.on_started = on_started
        self.signal: Optional[int] = None  # the signal that started the shutdown
        self._drain_task: Optional[asyncio.Task] = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
        try:
            yield
        finally:  # unlike uvicorn's, the signal is not raised again: a drained server exits 0
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(sig).name
        if self.signal is not None:
            logger.warning("%s again: exiting now, %d requests in flight are cut off", name,
                           self.lifecycle.in_flight)
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(128 + sig)
        self.signal = sig
        self.lifecycle.draining = True  # from here on, new requests get 503 and /health 503
        if not self.started:  # still starting: nothing to drain
            self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit and self.on_started is not None:
            self.on_started()

    async def on_tick(self, counter: int) -> bool:
        if self.signal is not None and self._drain_task is None and not self.should_exit:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        life, timeout = self.lifecycle, self.shutdown_timeout
        logger.info("%s: shutting down: new requests get 503 and /health 503; %d requests in flight get up "
                    "to %g s to finish (--shutdown-timeout); a second signal exits at once",
                    signal.Signals(self.signal or signal.SIGTERM).name, life.in_flight, timeout)
        if not await life.wait_idle(timeout):
            logger.warning("shutdown timeout (%g s) passed: aborting the %d requests still running", timeout,
                           life.in_flight)
            life.abort_all()
            if not await life.wait_idle(5.0):
                logger.warning("%d requests did not end after the abort; closing their connections",
                               life.in_flight)
        logger.info("no request in flight; stopping")
        self.should_exit = True
