"""How much of the device each step uses: FLOPs done and bytes moved, against the device's peaks.

Per step (formulas kept simple on purpose, and the same ones the roofline uses):
  bytes = weight bytes (every weight is read once per step)
        + KV read:    sum over sequences of context_len * kv_bytes_per_token
        + KV written: tokens computed * kv_bytes_per_token
  flops = 2 * linear weights (lm_head excluded) * tokens computed
        + 2 * lm_head weights * rows that produce logits
        + attention: 4 * layers * (heads * head_dim) * (keys each query token attends to)
MBU = bytes / seconds / peak bandwidth; MFU = flops / seconds / peak FLOP/s. The peaks are the
device's datasheet numbers on GPUs and a short probe on CPU (bench/probe.py).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelCost:
    weight_bytes: int
    kv_bytes_per_token: int
    linear_params: int  # every nn.Linear-like weight except the output head
    head_params: int  # vocab x hidden
    num_layers: int
    q_size: int  # heads * head_dim

    def step(self, chunks: list[tuple[int, int]], logit_rows: int) -> tuple[float, float]:
        """(flops, bytes) of one step; chunks are (tokens already computed, tokens computed now)."""
        tokens = sum(n for _, n in chunks)
        # A query at position p attends to p + 1 keys; a chunk at [c, c + n) sums to n*c + n(n+1)/2.
        keys = sum(n * c + n * (n + 1) // 2 for c, n in chunks)
        flops = 2.0 * self.linear_params * tokens + 2.0 * self.head_params * logit_rows \
            + 4.0 * self.num_layers * self.q_size * keys
        kv_read = sum(c + n for c, n in chunks) * self.kv_bytes_per_token
        nbytes = float(self.weight_bytes + kv_read + tokens * self.kv_bytes_per_token)
        return flops, nbytes


class UtilizationMeter:
    """Totals since start, and a sliding window of recent steps for live gauges."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.total_flops = self.total_bytes = self.total_seconds = 0.0
        self._recent: deque[tuple[float, float, float, float]] = deque()  # (end time, flops, bytes, s)
        self.peak_flops: Optional[float] = None
        self.peak_bandwidth: Optional[float] = None

    def record(self, flops: float, nbytes: float, seconds: float) -> None:
        now = time.monotonic()
        self.total_flops += flops
        self.total_bytes += nbytes
        self.total_seconds += seconds
        self._recent.append((now, flops, nbytes, seconds))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def set_peaks(self, peak_flops: Optional[float], peak_bandwidth: Optional[float]) -> None:
        self.peak_flops, self.peak_bandwidth = peak_flops, peak_bandwidth

    def _rates(self, recent: bool) -> tuple[float, float]:
        if recent:
            flops = sum(r[1] for r in self._recent)
            nbytes = sum(r[2] for r in self._recent)
            secs = sum(r[3] for r in self._recent)
        else:
            flops, nbytes, secs = self.total_flops, self.total_bytes, self.total_seconds
        return (flops / secs, nbytes / secs) if secs > 0 else (0.0, 0.0)

    def mbu(self, recent: bool = False) -> Optional[float]:
        return self._rates(recent)[1] / self.peak_bandwidth if self.peak_bandwidth else None

    def mfu(self, recent: bool = False) -> Optional[float]:
        return self._rates(recent)[0] / self.peak_flops if self.peak_flops else None
