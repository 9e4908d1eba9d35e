"""Rank 0's side of a multi-process model: start or join the other ranks, hand every step to them,
and turn a dead or hung rank into a clear error.

Two ways to get the ranks:
- one machine, nothing set up: rank 0 (the engine) spawns tensor_parallel_size *
  pipeline_parallel_size - 1 worker processes and they meet on a free local port;
- torchrun (or anything that sets MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK, across machines
  too): every rank runs the same command; rank 0 becomes the engine and the others turn into model
  workers inside the engine's constructor and exit when rank 0 shuts down.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from tokenmill.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from tokenmill.distributed.parallel_state import (ParallelState, destroy_distributed, init_distributed, send_object,
                                                  set_parallel_state)
from tokenmill.distributed.shm_allreduce import PeerError
from tokenmill.distributed.worker import worker_main

logger = logging.getLogger(__name__)


_STARTUP_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A rank died, hung, or failed: the engine cannot go on."""


def torchrun_rank() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) when launched by torchrun or a compatible launcher."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_transport_error(e: BaseException) -> bool:
    """gloo raises its timeouts and closed connections as plain RuntimeErrors."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "nccl", "timed out", "connection"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_layout(parallel: ParallelConfig, model_config: ModelConfig) -> None:
    """Build every rank's model on meta before any process starts: a layout that does not fit
    (heads, KV heads, layers, GPTQ group boundaries) is a ValueError here, not a crashed worker."""
    from tokenmill.models.loader import build_model, rank_weights_folder

    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    try:
        for rank in range(tp * pp):
            set_parallel_state(ParallelState(tp_size=tp, tp_rank=rank % tp, pp_size=pp, pp_rank=rank // tp))
            build_model(model_config, rank_weights_folder(model_config.model)[0], verify=False)
    finally:
        set_parallel_state(ParallelState())


class MultiprocExecutor:
    def __init__(self, parallel: ParallelConfig, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig) -> None:
        self.parallel = parallel
        self.procs: list[subprocess.Popen] = []
        self.failed: Optional[DistributedError] = None
        self.ready = False  # set by the engine once every rank is in its step loop
        self.closed = False  # after shutdown: the process group may belong to a newer engine by then
        self._threads = torch.get_num_threads()
        # Starting a worker (imports, then the rendezvous) may take longer than any step; one that
        # dies on the way is seen at once, so this bound only catches a start-up that hangs.
        self._startup_timeout = max(parallel.distributed_timeout_seconds, _STARTUP_TIMEOUT_S)
        world = parallel.world_size
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        backend = backend_for(model_config.torch_device)
        check_layout(parallel, model_config)
        launched = torchrun_rank()
        store = None
        if launched is not None:
            rank, env_world, local_rank = launched
            if env_world != world:
                raise ValueError(f"WORLD_SIZE={env_world}, but tensor_parallel_size * pipeline_parallel_size = {world}")
            if model_config.torch_device.type == "cuda":
                model_config.torch_device = torch.device("cuda", local_rank)
            if rank != 0:  # a model worker: serve rank 0's steps until it shuts down, then leave
                worker_main(rank, tp, pp, "env://", backend, parallel.distributed_timeout_seconds,
                            model_config, cache_config, scheduler_config, None, None)
                raise SystemExit(0)
            init_method = "env://"
        else:
            # Rank 0 serves the rendezvous store, so it can watch the workers join (see _rendezvous).
            store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=self._startup_timeout))
            init_method = f"store://127.0.0.1:{store.port}"
            # Ranks share this machine's cores; oversubscribed threads would slow every rank down.
            threads = max(1, (os.cpu_count() or 1) // world) if model_config.torch_device.type == "cpu" else None
            base = model_config.torch_device.index or 0
            try:
                for rank in range(1, world):
                    # Spawned ranks take the GPUs after rank 0's, one each.
                    device = f"cuda:{base + rank}" if model_config.torch_device.type == "cuda" else None
                    args = (rank, tp, pp, init_method, backend, parallel.distributed_timeout_seconds,
                            model_config, cache_config, scheduler_config, threads, device)
                    p = subprocess.Popen([sys.executable, "-m", "tokenmill.distributed.worker"], stdin=subprocess.PIPE)
                    self.procs.append(p)
                    p.stdin.write(pickle.dumps(args))
                    p.stdin.close()
            except BaseException:
                self._terminate()
                raise
            if threads:
                torch.set_num_threads(threads)
            if model_config.torch_device.type == "cuda":
                model_config.torch_device = torch.device("cuda", base)
        try:
            if store is not None:
                self._wait_for_workers(store, world)
            init_distributed(tp, pp, 0, init_method, backend, parallel.distributed_timeout_seconds,
                             model_config.torch_device, self._dead_worker, store)
        except BaseException as e:
            self._terminate()
            destroy_distributed()  # a half-built group would block the next engine in this process
            if not isinstance(e, Exception):
                raise
            raise DistributedError(f"the {world} ranks could not meet at {init_method}: {e}") from e
        atexit.register(self.shutdown)

    def _wait_for_workers(self, store: Any, world: int) -> None:
        """Until every worker has reached the store: one that dies on the way (an import error, no
        memory) is reported at once, not after the rendezvous timeout."""
        deadline = time.monotonic() + self._startup_timeout
        keys = [f"started/{r}" for r in range(1, world)]
        while not store.check(keys):
            dead = self._dead_worker()
            if dead:
                raise DistributedError(f"{dead} while starting (its error is printed above)")
            if time.monotonic() > deadline:
                raise DistributedError(f"the workers did not all start within {self._startup_timeout:g} s")
            time.sleep(0.05)

    def execute(self, step: Any, run: Callable[[Any], Any]) -> Any:
        """Send the step to every rank, run rank 0's share, return rank 0's result."""
        if self.failed is not None:
            raise self.failed
        try:
            send_object(step.for_workers(), self.parallel.distributed_timeout_seconds)
            return run(step)
        except BaseException as e:
            # Whatever stopped rank 0 mid-step (a peer, a local error, Ctrl-C), the other ranks are
            # now inside a step rank 0 left: they cannot be brought back in line, only stopped.
            self.failed = DistributedError(self._diagnose(e))
            self.shutdown(graceful=False)  # also frees this process for a new engine
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise self.failed from e

    def _dead_worker(self) -> Optional[str]:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                return f"rank {i + 1} exited with code {p.returncode}"
        return None

    def _diagnose(self, e: BaseException) -> str:
        dead = [f"rank {i + 1} (exit code {p.poll()})" for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            what = f"{', '.join(dead)} died"
        elif isinstance(e, (dist.DistError, PeerError)) or _is_transport_error(e):
            what = (f"a rank did not answer within {self.parallel.distributed_timeout_seconds:g} s or closed its "
                    "connection (dead or hung)")
        else:
            what = f"rank 0 stopped in the middle of it ({type(e).__name__})"
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (f"tensor/pipeline-parallel step failed: {what}; the engine cannot continue and must be "
                f"restarted. Cause: {cause}")

    def _terminate(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("worker process %d did not exit after SIGKILL", p.pid)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers and leave the process group. Gracefully (a stop message) only when they
        are idle in their step loop; otherwise, or if they do not stop, they are killed. Only the
        first call does anything (a deleted LLM may be collected after the next one started)."""
        if self.closed:
            return
        self.closed = True
        if graceful and self.ready and self.failed is None and dist.is_initialized():
            try:  # None is the workers' signal to stop
                send_object(None, self.parallel.distributed_timeout_seconds)
            except RuntimeError as e:
                logger.warning("could not stop the workers cleanly: %s", e)
            for rank, p in enumerate(self.procs, start=1):
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    logger.warning("rank %d did not stop within 10 s; killing it", rank)
        self._terminate()
        if dist.is_initialized():
            destroy_distributed()
        torch.set_num_threads(self._threads)
        atexit.unregister(self.shutdown)
        if self.failed is None:  # a later step must fail clearly, not hang on a closed group
            self.failed = DistributedError("the engine was shut down; build a new LLM to go on")
