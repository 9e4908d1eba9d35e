"""The engine behind a server: one background thread runs the step loop; any number of asyncio
streams submit requests and receive their outputs.

The engine's data structures belong to that thread alone. Requests and aborts reach it through a
queue; outputs come back through `loop.call_soon_threadsafe` into each request's asyncio queue.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.stats import EngineStats
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; nothing more will be served."""


@dataclass
class LoadSnapshot:
    """What admission control reads, refreshed by the engine thread after every step."""

    num_running: int = 0
    num_waiting: int = 0
    waiting_tokens: int = 0  # tokens of queued requests still to be computed
    free_blocks: int = 0  # free or evictable KV blocks


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Optional[Callable[[LLMEngine, bool], None]] = None) -> None:
        self.engine = engine
        # Called on the engine thread after each loop turn with whether a step ran (the metrics).
        self.on_step = on_step
        # More callbacks like on_step, called after it (the bouncer's load probe: server/load_probe.py).
        self.step_listeners: list[Callable[[LLMEngine, bool], None]] = []
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._pending_tokens = 0  # accepted, not yet handed to the scheduler
        self._pending_requests = 0
        # Handed to the scheduler since the last load snapshot: not in it yet, no longer pending.
        self._unseen_tokens = 0
        self._unseen_requests = 0
        self.load = LoadSnapshot(free_blocks=engine.block_manager.num_free_blocks)
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------------------
    @property
    def is_serving(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def admission_view(self) -> tuple[int, int, int, int]:
        """(requests in the system, queued tokens, free KV blocks, running requests)."""
        with self._lock:
            load = self.load
            return (load.num_running + load.num_waiting + self._pending_requests + self._unseen_requests,
                    load.waiting_tokens + self._pending_tokens + self._unseen_tokens, load.free_blocks,
                    load.num_running)

    def _register(self, request_id: str, num_prompt_tokens: int) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        out_q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            # Checked under the lock the loop sets `error` under, so no stream misses the news.
            if not self.is_serving:
                raise EngineDeadError(f"the engine is not serving: {self.error!r}")
            self._streams[request_id] = (loop, out_q)
            self._pending_requests += 1
            self._pending_tokens += num_prompt_tokens
        return loop, out_q

    async def _outputs(self, request_id: str, out_q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await out_q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id, None, None))

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: Optional[str] = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs (cumulative) until it finishes.

        ValueError from validation is raised before anything is yielded. Closing the iterator
        early (a client that went away) aborts the request and frees its KV blocks.
        """
        _, out_q = self._register(request_id, len(prompt_token_ids))
        self._inbox.put(("add", request_id, {"prompt_token_ids": prompt_token_ids, "prompt": prompt,
                                             "priority": priority}, params))
        async for out in self._outputs(request_id, out_q):
            yield out

    def generate_batch(self, requests: list[tuple[str, list[int], SamplingParams, int]]
                       ) -> list[AsyncIterator[RequestOutput]]:
        """Submit several requests at once (one message: they reach the scheduler in the same
        step) and return one output iterator each, as `generate` yields them.

        Each request is (request id, prompt token ids, params, priority).
        NOTE: the caller must iterate (or close) every iterator; that is what unregisters it.
        """
        queues: list[asyncio.Queue] = []
        try:
            for rid, ids, *_ in requests:
                queues.append(self._register(rid, len(ids))[1])
        except EngineDeadError:
            with self._lock:  # undo the ones registered before the news
                for (rid, ids, *_), _q in zip(requests, queues):
                    self._streams.pop(rid, None)
                    self._pending_requests -= 1
                    self._pending_tokens -= len(ids)
            raise
        self._inbox.put(("add_many", None, [(rid, {"prompt_token_ids": ids, "prompt": None, "priority": priority},
                                             params) for rid, ids, params, priority in requests], None))
        return [self._outputs(rid, q) for (rid, *_), q in zip(requests, queues)]

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None, None))

    @property
    def is_running(self) -> bool:
        """Whether the engine thread is still alive (a step may be under way)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("stop", None, None, None))
        self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------
    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, out_q = target
            try:
                loop.call_soon_threadsafe(out_q.put_nowait, item)
            except RuntimeError:  # that event loop is closed
                pass

    def _handle(self, msg: tuple) -> None:
        kind, rid, prompt, params = msg
        if kind == "add_many":
            for item in prompt:
                self._handle(("add", *item))
        elif kind == "add":
            n = len(prompt["prompt_token_ids"])
            with self._lock:
                self._pending_requests -= 1
                self._pending_tokens -= n
                alive = rid in self._streams
                if alive:
                    self._unseen_requests += 1
                    self._unseen_tokens += n
            if not alive:  # the client left before its request reached the engine
                return
            try:
                priority = prompt.pop("priority", 0)  # travels with the prompt; not part of it
                self.engine.add_request(prompt, params, request_id=rid, priority=priority)
            except Exception as e:  # noqa: BLE001 - a bad request must fail alone, not the loop
                self._deliver(rid, e if isinstance(e, ValueError) else ValueError(f"request refused: {e}"))
        elif kind == "abort":
            self.engine.abort_request(rid)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                block = not engine.has_unfinished_requests()
                try:
                    msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                    self._handle(msg)
                    while True:
                        self._handle(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                stepped = engine.has_unfinished_requests()
                if stepped:
                    for out in engine.step():
                        self._deliver(out.request_id, out)
                self._refresh_load()
                if self.on_step is not None:
                    self.on_step(engine, stepped)
                for listener in self.step_listeners:
                    listener(engine, stepped)
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiting stream
            logger.exception("engine loop failed")
            with self._lock:
                self.error = e
                rids = list(self._streams)
            for rid in rids:
                self._deliver(rid, EngineDeadError(f"engine failed: {e!r}"))

    def _refresh_load(self) -> None:
        sched = self.engine.scheduler
        snap = LoadSnapshot(
            num_running=len({s.request.request_id for s in sched.running}),
            num_waiting=len({s.request.request_id for s in sched.waiting}) + self.engine.num_compiling,
            waiting_tokens=sum(s.num_tokens - s.num_computed_tokens for s in sched.waiting)
            + sum(s.num_tokens for r in self.engine.compiling for s in r.seqs),
            free_blocks=self.engine.block_manager.num_free_blocks)
        with self._lock:
            self.load = snap
            self._unseen_requests = self._unseen_tokens = 0

    def stats(self) -> EngineStats:
        return self.engine.get_stats()

