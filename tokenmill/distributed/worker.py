"""A model worker: every rank but 0. It holds its slice of the model and its KV pool, and runs
each step rank 0 sends it; it never schedules or samples."""
from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from typing import Optional

import torch

from tokenmill.config import CacheConfig, ModelConfig, SchedulerConfig
from tokenmill.distributed.parallel_state import destroy_distributed, init_distributed, recv_object

logger = logging.getLogger(__name__)


def worker_main(rank: int, tp: int, pp: int, init_method: str, backend: str, timeout_s: float,
                model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                num_threads: Optional[int], device: Optional[str], watch_parent: bool = False) -> None:
    from tokenmill.engine.model_runner import ModelRunner  # the runner imports the executor side

    from tokenmill.logs import configure_logging, resolve

    try:  # rank 0's level and format (`tokenmill serve` exports them), else WARNING in text
        level, fmt = resolve(None, None)
    except ValueError:
        level, fmt = "WARNING", "text"
    configure_logging(level, fmt, rank=rank)
    # Ctrl-C reaches the whole process group; rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if num_threads:
        torch.set_num_threads(num_threads)
    if device is not None:
        model_config.torch_device = torch.device(device)
    parent = os.getppid()

    def alive() -> Optional[str]:  # a worker started by rank 0 outlives it only by mistake
        return "rank 0 (the engine) exited" if watch_parent and os.getppid() != parent else None

    init_distributed(tp, pp, rank, init_method, backend, timeout_s, model_config.torch_device, alive)
    runner = ModelRunner(model_config, cache_config, scheduler_config)
    steps = 0
    while True:
        step = recv_object()
        if step is None:
            break
        runner.run(step)
        steps += 1
    logger.info("rank %d stopping after %d steps", rank, steps)
    destroy_distributed()


if __name__ == "__main__":
    # Started by rank 0 as `python -m tokenmill.distributed.worker` (not multiprocessing's spawn,
    # which would re-run the user's script); the arguments come pickled on stdin.
    worker_main(*pickle.load(sys.stdin.buffer), watch_parent=True)
