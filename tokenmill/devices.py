"""Devices: datasheet peaks of known GPUs, and short probes of the machine tokenmill runs on.

One place for what a device can do, used by the engine (the peaks behind live MBU/MFU) and by the
benchmarks and the roofline (the bounds they report).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass
class Device:
    """Peak dense FLOP/s per dtype, memory bandwidth (bytes/s) and capacity (bytes; None: unknown)."""
    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    memory_bytes: Optional[float]
    source: str

    def __post_init__(self) -> None:
        if not self.peak_flops:
            raise ValueError(f"device {self.name!r}: no peak FLOP/s given")
        for dt, f in self.peak_flops.items():
            if dt not in DTYPE_BYTES:
                raise ValueError(f"device {self.name!r}: unknown dtype {dt!r} (known: {', '.join(DTYPE_BYTES)})")
            if not f > 0:
                raise ValueError(f"device {self.name!r}: peak FLOP/s for {dt} must be positive, got {f}")
        if not self.bandwidth > 0:
            raise ValueError(f"device {self.name!r}: bandwidth must be positive, got {self.bandwidth}")
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise ValueError(f"device {self.name!r}: memory must be positive, got {self.memory_bytes}")

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"device {self.name!r} has no {dtype} peak (has: {', '.join(self.peak_flops)})")
        return self.peak_flops[dtype]

    def ops_per_byte(self, dtype: str) -> float:
        return self.peak(dtype) / self.bandwidth


# Dense (no 2:4 sparsity) tensor-core peaks, SXM parts unless named. Memory is the marketed decimal
# capacity (80e9 although the HBM holds 80 GiB): the smaller number keeps the fit conservative.
DEVICES: dict[str, Device] = {
    "A100": Device("A100", {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 2.039e12, 80e9,
                   "NVIDIA A100 datasheet (SXM 80GB, dense); float32 is non-tensor FP32 (TF32 tensor: 156e12)"),
    "H100": Device("H100", {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12, "fp8": 1.98e15},
                   3.35e12, 80e9, "NVIDIA H100 datasheet (SXM, dense)"),
    "H200": Device("H200", {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12, "fp8": 1.98e15},
                   4.8e12, 141e9, "NVIDIA H200 datasheet (SXM, dense; same GH100 compute as H100)"),
    "A6000": Device("A6000", {"float32": 38.7e12, "bfloat16": 154.8e12, "float16": 154.8e12}, 768e9, 48e9,
                    "NVIDIA RTX A6000 datasheet (tensor 309.7e12 is with sparsity; dense is half)"),
    "V100": Device("V100", {"float32": 15.7e12, "float16": 125e12}, 900e9, 32e9,
                   "NVIDIA V100 datasheet (SXM2 32GB; fp16 tensor; no bf16/fp8)"),
}
DEVICE_CHOICES = (*DEVICES, "cpu", "custom")


def _best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read_bandwidth(device: str | torch.device = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second read from memory, the best of a reduction and a matrix-vector product.

    Decode at batch 1 streams every weight once per token, which is what a large matrix-vector
    product does; a plain sum is the other common read probe. The higher of the two is taken, so
    the bound it implies is never flattering to the engine.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = mib * 2**20 // 4
    cols = 4096
    w = torch.ones(n // cols, cols, device=device)
    x = torch.ones(cols, device=device)
    bytes_read = w.numel() * 4
    t_sum = _best_time(lambda: w.sum(), repeats, sync)
    t_mv = _best_time(lambda: torch.mv(w, x), repeats, sync)
    return bytes_read / min(t_sum, t_mv)


def measure_matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                         repeats: int = 3) -> float:
    """FLOP/s of a square matmul, the best of a few runs: what prefill-sized GEMMs can reach."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, repeats, sync)


def table_device(name: str) -> Optional[Device]:
    """The table's row for a name, matched case-insensitively ("h100" is the H100)."""
    return next((d for key, d in DEVICES.items() if key.lower() == name.strip().lower()), None)


def device_peaks_for(device_name: str, dtype: Any) -> Optional[tuple[float, float]]:
    """(peak FLOP/s, bandwidth) from the table for a GPU whose name contains a row's name
    (torch.cuda.get_device_name gives e.g. "NVIDIA H100 80GB HBM3")."""
    key = str(dtype).replace("torch.", "")
    for name, dev in DEVICES.items():
        if name.lower() in device_name.lower() and key in dev.peak_flops:
            return dev.peak_flops[key], dev.bandwidth
    return None


_PROBED: dict[tuple[str, str], tuple[float, float]] = {}


def peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(peak FLOP/s, bandwidth) the engine sizes its batch by and measures utilization against:
    the datasheet on a known GPU, a short probe otherwise (0.5-2 s), done once per process: the
    engine's start (batch limits) and the meter (MBU/MFU) then read the same numbers."""
    if device.type == "cuda":
        known = device_peaks_for(torch.cuda.get_device_name(device), dtype)
        if known is not None:
            return known
    key = (str(device), str(dtype))
    if key not in _PROBED:
        _PROBED[key] = measure_matmul_flops(device, dtype), measure_read_bandwidth(device)
    return _PROBED[key]


def cpu_device(dtype: str = "float32", n: int = 2048, mib: int = 512, flops: Optional[float] = None,
               bandwidth: Optional[float] = None) -> Device:
    """This machine's CPU, measured now (what is given is not probed: each probe takes seconds)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"cannot probe {dtype} matmul on the CPU")
    peak = flops if flops is not None else measure_matmul_flops("cpu", getattr(torch, dtype), n)
    bw = bandwidth if bandwidth is not None else measure_read_bandwidth("cpu", mib=mib)
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    logger.info("cpu: %s %.3g FLOP/s, %.3g B/s, %.3g B RAM", dtype, peak, bw, ram)
    return Device("cpu", {dtype: peak}, bw, ram, f"measured now: {n}^3 matmul, {mib} MiB read (unless given)")


def resolve_device(name: str, dtype: str, flops: Optional[float] = None, bandwidth: Optional[float] = None,
                   memory_gib: Optional[float] = None) -> Device:
    """A table row (any letter case), the probed CPU or a custom device, with the given peak,
    bandwidth or memory overriding the table's."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    for flag, v in (("--flops", flops), ("--bandwidth", bandwidth), ("--memory-gib", memory_gib)):
        if v is not None and not v > 0:
            raise ValueError(f"{flag} must be positive, got {v}")
    key = name.strip().lower()
    known = table_device(name)
    if key == "custom":
        if flops is None or bandwidth is None:
            raise ValueError("--device custom needs --flops and --bandwidth")
        dev = Device("custom", {dtype: flops}, bandwidth, None, "given on the command line")
    elif key == "cpu":
        if dtype == "fp8":
            raise ValueError("device 'cpu' has no fp8 matmul to probe")
        dev = cpu_device(dtype, flops=flops, bandwidth=bandwidth)
    elif known is not None:
        dev = known
        if flops is None:
            dev.peak(dtype)  # a dtype the device lacks is an error unless its peak is given
        if flops is not None or bandwidth is not None:
            dev = dataclasses.replace(dev, peak_flops={**dev.peak_flops, **({dtype: flops} if flops else {})},
                                      bandwidth=bandwidth or dev.bandwidth, source=dev.source + " (overridden)")
    else:
        raise ValueError(f"unknown device {name!r} (known: {', '.join(DEVICE_CHOICES)}; any letter case)")
    # A copy either way: callers may adjust it without touching the shared table.
    return dataclasses.replace(dev, memory_bytes=memory_gib * 2**30 if memory_gib is not None else dev.memory_bytes)
