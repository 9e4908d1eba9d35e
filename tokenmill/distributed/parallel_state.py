"""Who this process is in the parallel layout, and the collectives the model layers call.

Ranks are laid out stage-major: rank = pp_rank * tp_size + tp_rank, so a pipeline stage is a
block of consecutive ranks and rank 0 (the engine, with the scheduler) is stage 0's first rank.

Two process groups per rank, as vLLM keeps them:
- the *compute* groups (NCCL on CUDA, gloo on CPU) carry activations: the tensor-parallel
  all-reduce/all-gather and the stage-to-stage sends. They time out after `timeout` seconds, so a
  dead or hung peer turns into an error instead of a hang;
- the *control* group (always gloo, on CPU) carries the step inputs from rank 0. Workers wait on
  it between steps, which may be any length of idle time, so its timeout is long; a dead rank 0
  still shows at once, as a closed connection.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import platform
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Workers wait on the control group between steps: an idle server may wait this long.
_CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    tp_group: Any = None  # this stage's tensor-parallel group (None when tp_size == 1)
    control_group: Any = None  # gloo group of all ranks, for step inputs
    shm: Any = None  # ShmAllReduce over tp_group when its ranks share one machine's CPUs

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int, tp_rank: Optional[int] = None) -> int:
        """Global rank of a tensor-parallel rank (this one's by default) in another stage."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)


_state = ParallelState()


def get_parallel_state() -> ParallelState:
    return _state


def set_parallel_state(state: ParallelState) -> None:
    global _state  # one layout per process, read by the layers while the model is built
    _state = state


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Within it, this process is a world of one: a model built here is whole (no shards), and its
    forward calls no collective. Rank 0 runs a draft model this way beside its shard of the
    target; only the engine thread builds or runs models, so swapping the layout is safe."""
    global _state
    saved, _state = _state, ParallelState()
    try:
        yield
    finally:
        _state = saved


def init_distributed(tp_size: int, pp_size: int, rank: int, init_method: str, backend: str,
                     timeout_s: float, device: Optional[torch.device] = None,
                     alive: Optional[Callable[[], Optional[str]]] = None, store: Any = None) -> ParallelState:
    """Join the process group and build the layout's groups; every rank calls this alike.

    init_method is env:// (torchrun), tcp://host:port, or store://host:port for workers joining
    the store rank 0 serves (rank 0 passes that store itself)."""
    world = tp_size * pp_size
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL builds its communicators on the current device
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    elif init_method.startswith("store://"):  # ranks rank 0 started: meet through its store
        host, _, port = init_method[len("store://"):].rpartition(":")
        store = dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)
        store.set(f"started/{rank}", "1")  # rank 0 watches for these (see executor)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    # new_group must be called by every rank for every group, in the same order; a group does
    # not inherit the default group's timeout.
    tp_groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size)), timeout=timeout) for s in range(pp_size)]
    control = dist.new_group(list(range(world)), backend="gloo", timeout=_CONTROL_TIMEOUT)
    state = ParallelState(tp_size=tp_size, tp_rank=rank % tp_size, pp_size=pp_size, pp_rank=rank // tp_size,
                          tp_group=tp_groups[rank // tp_size] if tp_size > 1 else None, control_group=control)
    # The shared-memory sum relies on x86's store ordering (no explicit fences in Python).
    if (backend == "gloo" and tp_size > 1 and os.environ.get("TOKENMILL_SHM_ALLREDUCE", "1") != "0"
            and platform.machine().lower() in ("x86_64", "amd64")):
        hosts: list[Any] = [None] * tp_size
        dist.all_gather_object(hosts, socket.gethostname(), group=state.tp_group)
        if len(set(hosts)) == 1:
            from tokenmill.distributed.shm_allreduce import ShmAllReduce

            state.shm = ShmAllReduce.create(state.tp_group, state.tp_rank, tp_size, timeout_s, alive)
    set_parallel_state(state)
    logger.info("rank %d of %d: tensor-parallel rank %d/%d, pipeline stage %d/%d (%s)", rank, world,
                state.tp_rank, tp_size, state.pp_rank, pp_size, backend)
    return state


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_state(ParallelState())


def send_object(obj: Any, timeout_s: float) -> None:
    """Rank 0: broadcast a picklable object (a step, or None to stop) on the control group.

    Waits at most timeout_s for the other ranks to take it: a rank frozen between steps would
    otherwise keep rank 0 waiting for the control group's long timeout.
    """
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    for t in (torch.tensor([data.numel()], dtype=torch.int64), data):
        work = dist.broadcast(t, src=0, group=_state.control_group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as e:
            from tokenmill.distributed.shm_allreduce import PeerError

            raise PeerError(f"a rank did not take the next step within {timeout_s:g} s: {e}") from e


def recv_object() -> Any:
    """Every other rank: the next object rank 0 sends (waits as long as the engine is idle)."""
    size = torch.empty(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=_state.control_group)
    data = torch.empty(int(size[0]), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=_state.control_group)
    return pickle.loads(data.numpy().tobytes())


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the stage's tensor-parallel ranks (the row-parallel output and the embedding)."""
    s = _state
    if s.tp_size == 1:
        return x
    if s.shm is not None:
        return s.shm.all_reduce(x)
    dist.all_reduce(x, group=s.tp_group)
    return x


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every tensor-parallel rank's x along the last dimension (vocab-parallel logits)."""
    s = _state
    if s.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(s.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=s.tp_group)
    return torch.cat(parts, dim=-1)


def shard_range(units: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """(first unit, number of units) this rank holds of `units` split `size` ways.

    Units that do not split evenly are an error, except fewer units than ranks where the ranks
    divide among them: each unit is then replicated on size // units ranks (KV heads under GQA).
    """
    if units % size == 0:
        n = units // size
        return rank * n, n
    if size % units == 0:
        return rank * units // size, 1
    raise ValueError(f"{what} ({units}) does not split over tensor_parallel_size={size}: it must be a multiple "
                     "or a divisor of it")


def local_heads(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(query heads, KV heads) on this rank; KV heads fewer than ranks are replicated."""
    tp = _state.tp_size
    if num_heads % tp:
        raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by tensor_parallel_size={tp}")
    shard_range(num_kv_heads, _state.tp_rank, tp, "num_key_value_heads")  # validates
    return num_heads // tp, max(1, num_kv_heads // tp)
