"""How much of the device each step uses: FLOPs done and bytes moved (model_cost.ModelCost.step),
against the device's peaks (devices.peaks: datasheet numbers on known GPUs, a short probe
otherwise). MBU = bytes / seconds / peak bandwidth; MFU = flops / seconds / peak FLOP/s.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Optional


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
