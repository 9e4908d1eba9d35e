"""A short probe of the memory bandwidth that decode can hope for on this device."""
from __future__ import annotations

import time

import torch


def _best_time(fn, repeats: int, sync) -> float:
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
