"""Engine configuration: one dataclass per concern, validated where it is built."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def eos_token_ids(generation_config: Any, hf_config: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a generation, as transformers' generate reads them: the generation
    config's eos_token_id, else the model config's, else the tokenizer's (each may be a list)."""
    for source in (generation_config, hf_config, tokenizer):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            return {eos}
        if isinstance(eos, (list, tuple)) and eos:
            return {int(t) for t in eos}
    return set()


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: Optional[str], device: torch.device) -> torch.dtype:
    """Pick the compute dtype.

    "auto" follows the checkpoint on CUDA (float32 checkpoints run in float16 there, as in vLLM),
    and on CPU keeps float32 checkpoints in float32 and runs 16-bit ones in bfloat16, because CPU
    float16 matmuls are slow and bfloat16 ones are not.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
        return _DTYPES[dtype]
    ckpt = _DTYPES.get(str(checkpoint_dtype or "float32").replace("torch.", ""), torch.float32)
    if device.type == "cuda":
        return torch.bfloat16 if ckpt == torch.bfloat16 else torch.float16
    return torch.float32 if ckpt == torch.float32 else torch.bfloat16


def default_device() -> torch.device:
    """CUDA when there is one, else CPU; nothing below assumes CUDA."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class ModelConfig:
    """What to run: the checkpoint folder and how to hold its weights."""

    model: str
    dtype: str = "auto"
    max_model_len: Optional[int] = None  # None: the checkpoint's max_position_embeddings
    seed: int = 0
    device: Optional[str] = None  # None: cuda if available, else cpu
    skip_tokenizer_init: bool = False  # benchmarks feed token ids and need no tokenizer
    # Linear-layer kernels: "auto" times the candidates on this machine and picks per weight shape
    # and batch bucket; "aten", "onednn" or "tokenmill" forces one (see kernels/linear.py).
    linear_backend: str = "auto"
    hf_config: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError("model must be a path to a local checkpoint folder")
        self.model = str(self.model)
        if not os.path.isdir(self.model):
            raise ValueError(f"model folder not found: {self.model!r} (tokenmill loads local checkpoints only)")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"no config.json in model folder {self.model!r}")
        from tokenmill.kernels.linear import BACKEND_NAMES

        if self.linear_backend not in BACKEND_NAMES:
            raise ValueError(f"linear_backend must be one of {', '.join(BACKEND_NAMES)}; got {self.linear_backend!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype != "auto" and self.dtype not in _DTYPES and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        from transformers import AutoConfig

        try:
            self.hf_config = AutoConfig.from_pretrained(self.model)
        except Exception as e:  # transformers raises several types for unknown model_type etc.
            raise ValueError(f"cannot read config.json in {self.model!r}: {e}") from e
        derived = getattr(self.hf_config, "max_position_embeddings", None) or getattr(
            self.hf_config, "n_positions", None) or 2048
        if self.max_model_len is None:
            self.max_model_len = int(derived)
        elif self.max_model_len > derived:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={derived}")
        self.torch_device = torch.device(self.device) if self.device else default_device()
        ckpt_dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        self.torch_dtype = resolve_dtype(self.dtype, str(ckpt_dtype) if ckpt_dtype else None, self.torch_device)


@dataclass
class CacheConfig:
    """The paged KV pool."""

    block_size: int = 16  # tokens per block; any size >= 1 works, 16 is vLLM's default
    # Bytes for the KV pool. None: on CUDA 90% of free device memory after the weights, less a
    # reserve for activations; on CPU a quarter of available RAM, capped at what max_num_seqs
    # full-length sequences could ever use.
    kv_cache_memory_bytes: Optional[int] = None
    num_gpu_blocks_override: Optional[int] = None  # tests use tiny pools to force preemption
    enable_prefix_caching: bool = True  # reuse the KV of prefixes computed before
    # GiB for the spill tier (0: off), as in vLLM: evicted cached blocks are copied there instead
    # of being dropped. Host memory when the model runs on a GPU; a separate pool on a CPU-only machine.
    swap_space: float = 0
    # The spill cost model (see kv_tiers.SpillCostModel): bytes/s between the tiers and FLOP/s
    # when recomputing. None: 10 GB/s and 100 GFLOP/s on CPU; 25 GB/s (PCIe) and 100 TFLOP/s on CUDA.
    spill_link_bandwidth: Optional[float] = None
    spill_device_flops: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if isinstance(self.swap_space, bool) or not isinstance(self.swap_space, (int, float)) or not self.swap_space >= 0:
            raise ValueError(f"swap_space must be a number of GiB >= 0, got {self.swap_space!r}")
        if self.swap_space and not self.enable_prefix_caching:
            raise ValueError("swap_space (the spill tier) needs enable_prefix_caching=True")
        for name in ("spill_link_bandwidth", "spill_device_flops"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def swap_space_bytes(self) -> int:
        return int(self.swap_space * 2**30)


@dataclass
class SchedulerConfig:
    """How much work one engine step may do."""

    # Sequences in the running batch, and tokens per step (prefill chunks + decodes; long prompts
    # prefill in chunks). None: chosen from the device's roofline when the engine is built
    # (engine/batch_limits.resolve_scheduler_limits): the decode batch where the weight GEMMs
    # near their compute-bound rate, capped by the KV pool, plus room for a prefill chunk as efficient.
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    max_model_len: int = 2048
    # "fcfs": first come, first served. "priority": a request's `priority` (lower runs first,
    # vLLM's convention; ties by arrival) orders the queue, and a waiting request preempts
    # running ones of lower priority when it needs their blocks.
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None: chosen from the roofline), got {value!r}")


@dataclass
class ParallelConfig:
    """How the model is split over processes: tensor_parallel_size ranks per pipeline stage."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Seconds a rank waits on a peer inside a step (a collective or a stage's activations) before
    # the engine fails with an error naming the problem: a dead or hung rank never hangs the engine.
    distributed_timeout_seconds: float = 120.0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.distributed_timeout_seconds > 0:
            raise ValueError(f"distributed_timeout_seconds must be positive, got {self.distributed_timeout_seconds}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size
