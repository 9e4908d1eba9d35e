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
        self._aborting = False
        self._waiting: set[asyncio.Task] = set()  # tasks awaiting a request's next output
        self._woken: set[asyncio.Task] = set()  # of those, the ones abort_all() cancelled

    @property
    def in_flight(self) -> int:
        return max(self.jobs, self.requests)

    def check_open(self) -> None:
        """Raise the 503 a new generation request gets while the server drains."""
        if self.draining:
            raise Refusal(503, "shutting_down", SHUTTING_DOWN, "shutting_down", retry_after=1.0)

    @property
    def aborting(self) -> bool:
        return self._aborting

    def abort_all(self) -> None:
        """End every request in flight now (each with finish_reason "abort"): those waiting for
        their next output are woken (see next_or_abort), the others stop at their next turn."""
        self._aborting = True
        for task in list(self._waiting):
            self._woken.add(task)
            task.cancel()

    async def next_or_abort(self, outputs: AsyncIterator[Any]) -> Any:
        """The next item of `outputs` (StopAsyncIteration at its end, as anext), or ABORTED once
        abort_all() is called, even while the engine has nothing for it yet (a queued request, a
        long prefill). No task per item: abort_all() cancels the waiting task itself, and the
        cancellation it caused (only that one) is turned into ABORTED here. The generator it
        interrupts closes, which aborts its engine request and frees its KV blocks."""
        if self._aborting:
            return ABORTED
        task = asyncio.current_task()
        if task is None:  # not in a task (cannot happen under the server): nothing to cancel
            return await anext(outputs)
        self._waiting.add(task)
        try:
            return await anext(outputs)
        except asyncio.CancelledError:
            if task not in self._woken or task.uncancel() > 0:  # someone else's cancellation too
                raise
            return ABORTED
        finally:
            self._waiting.discard(task)
            self._woken.discard(task)

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
