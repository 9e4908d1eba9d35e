"""Linear-layer kernels chosen by measurement, per weight shape and batch-size bucket.

At decode batch sizes a linear layer streams its weight from memory once per call, and which
implementation streams fastest depends on the CPU and its BLAS: on one AMD EPYC, MKL's matmul
(ATen's default there) reads float32 weights at 14-18 GB/s at one row, oneDNN at ~23 and
tokenmill's own kernel at ~25-30, while from 64 rows up the BLAS GEMMs win. So at load the
candidates are timed on the model's own shapes for every bucket of rows a step can bring, each
layer then calls the fastest for the rows it gets, and the choice is logged. `linear_backend`
(`--linear-backend`) forces one backend everywhere instead.

The timings are cached on disk, keyed by the CPU, torch version, thread count, shape and dtype,
so a server restart does not measure again. Candidates are timed over as many copies of a weight
as the model's linear weights take in all (up to 64 MiB, more than any last-level cache here):
a model larger than the cache streams from memory at every step and is timed so, while a small
one whose weights stay in cache is timed warm, as it will run.

NumPy's OpenBLAS is not a candidate although it streams fast in isolation: its worker threads
spin after each call and starve torch's OpenMP workers (attention ran 5x slower right after
every such matmul), which a per-kernel timing cannot see.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu_ops

logger = logging.getLogger(__name__)

# Rows (tokens) per call that get their own choice; a call uses the smallest bucket >= its rows.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BACKEND_NAMES = ("auto", "aten", "onednn", "tokenmill")
_SMALL_ROWS = 16  # tokenmill's weight-streaming kernel is a candidate up to this many rows
_STREAM_BYTES = 64 << 20  # most weight bytes cycled per timing: more than any L3 here
_CACHE_VERSION = 2

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [M, K], weight [N, K]) -> [M, N]


def _aten(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _tokenmill(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:
        return torch.ops.tokenmill_cpu.dense_gemv(x, w)
    return torch.ops.tokenmill_cpu.dense_gemv(x.float(), w).to(x.dtype)  # bf16 weights, f32 sums


def available_backends(device: torch.device, dtype: torch.dtype) -> dict[str, LinearFn]:
    """The backends that can run this device and dtype."""
    out: dict[str, LinearFn] = {"aten": _aten}
    if device.type != "cpu":
        return out  # CUDA keeps cuBLAS through ATen
    if torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16):
        out["onednn"] = _onednn
    if dtype in (torch.float32, torch.bfloat16) and cpu_ops.load():
        out["tokenmill"] = _tokenmill
    return out


def bucket_of(rows: int) -> int:
    for b in BUCKETS:
        if rows <= b:
            return b
    return BUCKETS[-1]


@dataclass
class LinearPlan:
    """For one weight shape: the backend for each bucket."""

    choice: dict[int, LinearFn]
    names: dict[int, str]
    # The backend for every row count up to the largest bucket: one list index per call (at
    # decode sizes a call's Python overhead is a fair share of its time).
    by_rows: list[LinearFn] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_rows = [self.choice[bucket_of(max(1, r))] for r in range(BUCKETS[-1] + 1)]

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            rows = x.shape[0]
            return (self.by_rows[rows] if rows <= BUCKETS[-1] else self.by_rows[-1])(x, w)
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        fn = self.by_rows[rows] if rows <= BUCKETS[-1] else self.by_rows[-1]
        return fn(x2, w).view(*x.shape[:-1], w.shape[0])


def _time_backend(fn: LinearFn, weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Seconds per call, the best of `repeats` passes over the weight copies."""
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    fn(x, weights[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - t0) / len(weights))
    return best


class BackendPicker:
    """Times candidate backends per (shape, bucket) and remembers the answers on disk."""

    def __init__(self, backends: dict[str, LinearFn], cache_path: Optional[Path] = None,
                 timer: Callable[[LinearFn, list[torch.Tensor], int, int], float] = _time_backend,
                 working_set_bytes: int = _STREAM_BYTES) -> None:
        self.backends = backends
        # Rounded to a power of two, so models of about the same size share cached timings.
        self.working_set = 1 << max(20, min(_STREAM_BYTES, working_set_bytes).bit_length() - 1)
        self.timer = timer
        self.cache_path = cache_path
        self.cache: dict[str, dict[str, float]] = {}
        if cache_path is not None and cache_path.is_file():
            try:
                data = json.loads(cache_path.read_text())
                if data.get("version") == _CACHE_VERSION:
                    self.cache = data.get("timings", {})
            except (OSError, ValueError):
                logger.warning("ignoring unreadable linear-backend cache %s", cache_path)

    def _key(self, n: int, k: int, dtype: torch.dtype, rows: int) -> str:
        thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")  # huge pages change what streaming costs
        return (f"{cpu_ops.build_id()}|{torch.__version__}|t{torch.get_num_threads()}|thp{thp}|ws{self.working_set >> 20}"
                f"|{n}x{k}|{dtype}|m{rows}")

    def timings(self, n: int, k: int, dtype: torch.dtype) -> dict[int, dict[str, float]]:
        """Seconds per call of every candidate, per bucket (measured, or from the cache)."""
        result: dict[int, dict[str, float]] = {}
        weights: Optional[list[torch.Tensor]] = None
        for rows in BUCKETS:
            key = self._key(n, k, dtype, rows)
            names = [b for b in self.backends if b != "tokenmill" or rows <= _SMALL_ROWS]
            cached = self.cache.get(key, {})
            if all(b in cached for b in names):
                result[rows] = {b: cached[b] for b in names}
                continue
            if weights is None:
                elem = torch.finfo(dtype).bits // 8
                copies = max(1, min(64, self.working_set // (n * k * elem)))
                weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
            # Large buckets are compute-bound and slow to time: fewer copies and passes.
            ws = weights if rows <= 32 else weights[:2]
            measured = {b: self.timer(self.backends[b], ws, rows, 3 if rows <= 64 else 2) for b in names}
            self.cache[key] = measured
            result[rows] = measured
        return result

    def plan(self, n: int, k: int, dtype: torch.dtype) -> LinearPlan:
        names = {rows: min(t, key=t.get) for rows, t in self.timings(n, k, dtype).items()}
        return LinearPlan({r: self.backends[b] for r, b in names.items()}, names)

    def save(self) -> None:
        if self.cache_path is None:
            return
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".tmp.{os.getpid()}")  # ranks may save at once
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "timings": self.cache}))
            os.replace(tmp, self.cache_path)
        except OSError as e:
            logger.warning("cannot write the linear-backend cache %s: %s", self.cache_path, e)


def default_cache_path() -> Path:
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tokenmill")
    return Path(root) / "linear_backends.json"


def assign_linear_kernels(model: torch.nn.Module, backend: str, device: torch.device, dtype: torch.dtype,
                          picker: Optional[BackendPicker] = None) -> dict[tuple[int, int], dict[int, str]]:
    """Give every float linear layer of the model its kernel plan (`module.linear_plan`).

    Returns, per weight shape (out, in), the backend name chosen for each bucket.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"linear_backend must be one of {', '.join(BACKEND_NAMES)}; got {backend!r}")
    backends = available_backends(device, dtype)
    if backend != "auto":
        if backend not in backends:
            raise ValueError(f"linear_backend={backend!r} is not available for {device.type}/{dtype} here "
                             f"(available: {', '.join(backends)})")
        backends = {backend: backends[backend]}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.device.type != "meta"]
    shapes = sorted({tuple(m.weight.shape) for m in linears})
    plans: dict[tuple[int, int], LinearPlan] = {}
    if len(backends) == 1:
        only = next(iter(backends))
        plans = {s: LinearPlan({b: backends[only] for b in BUCKETS}, {b: only for b in BUCKETS}) for s in shapes}
    else:
        elem = torch.finfo(dtype).bits // 8
        total = sum(m.weight.numel() for m in linears) * elem
        picker = picker or BackendPicker(backends, default_cache_path(), working_set_bytes=total)
        t0 = time.perf_counter()
        plans = {s: picker.plan(s[0], s[1], dtype) for s in shapes}
        picker.save()
        logger.info("linear backends timed in %.1f s", time.perf_counter() - t0)
    for m in linears:
        m.weight.data = m.weight.data.contiguous()  # the streaming kernel reads rows
        m.linear_plan = plans[tuple(m.weight.shape)]
    table = {s: p.names for s, p in plans.items()}
    for (n, k), names in table.items():
        logger.info("linear %dx%d: %s", n, k, ", ".join(f"{r}:{b}" for r, b in names.items()))
    return table


def linear(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through the module's plan when it has one, else ATen's."""
    plan = getattr(module, "linear_plan", None)
    if plan is None:
        return F.linear(x, weight, bias)
    out = plan(x, weight)
    return out + bias if bias is not None else out
