"""Builds and loads tokenmill's CPU kernels (`cpu_gemv.cpp`, `cpu_attention.cpp`) as torch ops, once per machine.

The build is compiled for this CPU (-march=native) and cached on disk by torch's extension
builder, keyed by the CPU's model and flags as well, so a machine with another processor builds
its own copy instead of loading instructions it lacks. Without a C++ compiler (or with
TOKENMILL_CPU_KERNELS=0) `load()` returns False and the callers keep the ATen paths.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Resolved: the same sources reached through a symlink must not look like new ones (a rebuild).
_SOURCES = [Path(__file__).resolve().with_name(n) for n in ("cpu_gemv.cpp", "cpu_attention.cpp")]
_HEADERS = [Path(__file__).resolve().with_name("cpu_simd.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}


@functools.lru_cache(maxsize=None)
def cpu_fingerprint() -> str:
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        text += "\n".join(lines)
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def build_id() -> str:
    """This CPU and this kernel source: what a cached measurement of the kernels depends on."""
    source = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    return f"{cpu_fingerprint()}-{hashlib.sha256(source).hexdigest()[:8]}"


def load() -> bool:
    """True when the ops torch.ops.tokenmill_cpu.* are available (building them if needed)."""
    if "ok" in _state:  # the hot path asks every call: no lock once decided
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        ok = False
        if os.environ.get("TOKENMILL_CPU_KERNELS", "1") == "0":
            logger.info("CPU kernels disabled by TOKENMILL_CPU_KERNELS=0")
        elif platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
            logger.info("no CPU kernels for %s; using ATen", platform.machine())
        else:
            try:
                from torch.utils.cpp_extension import load as load_extension

                t0 = time.perf_counter()
                load_extension(name=f"tokenmill_cpu_{cpu_fingerprint()}", sources=[str(p) for p in _SOURCES],
                               extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                               extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
                ok = hasattr(torch.ops.tokenmill_cpu, "dense_gemv")
                logger.info("CPU kernels ready in %.1f s (built once per machine, then cached)",
                            time.perf_counter() - t0)
            except Exception as e:  # no compiler, no ninja, a build error: keep the ATen paths
                logger.warning("CPU kernels unavailable (%s); using ATen matmuls", str(e).splitlines()[0][:200])
        _state["ok"] = ok
        return ok


def usable(t: torch.Tensor) -> bool:
    """Whether the fused CPU ops serve this tensor: float32 on the CPU, kernels built."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and load()
