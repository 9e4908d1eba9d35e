"""What a decode step costs, as "auto" estimates it: the roofline's prediction, corrected by the
steps it has measured.

The roofline times a step from its FLOPs and bytes at the device's peaks, and that is where the
estimate starts. Real steps differ from it in ways it cannot see: host work per forward (building
the batch, launching kernels, sampling), GEMMs of a few rows running far below peak FLOP/s, and
weights small enough to stay in a CPU's cache, which are read at cache bandwidth, not DRAM's, so
that verifying proposals turns compute-bound at a much smaller batch than the roofline says. (On
a 2-core EPYC the 22 MB demo model's verifying steps at batch 8 took 1.8x a plain step, where the
roofline predicted them nearly free.) So, per bucket of batch sizes, a step's time is a line in
the proposal rows it computes,

    t(rows) = a + b * rows      (a: the plain step; b: what each proposed token adds),

fitted to the pure decode steps measured in that bucket (recent ones weigh most), with the slope
held towards the roofline's until measurements at several row counts pin it down. A draft model's
proposing time is a line of the same kind, in the tokens its mirrors must catch up on.
"""
from __future__ import annotations

from dataclasses import dataclass

# Each new measurement multiplies the weight of the older ones by this: ~10 steps make the fit.
DECAY = 0.9
# The roofline's slope counts as this many steps measured with prior_x rows more than the mean
# (prior_x is the batch size: about the rows a step's proposals bring).
PRIOR_STEPS = 1.0


def bucket(batch: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a line: their steps cost alike."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass
class Line:
    """Exponentially weighted least squares of time on x, its slope shrunk towards a prior."""

    w: float = 0.0
    wx: float = 0.0
    wy: float = 0.0
    wxx: float = 0.0
    wxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        self.w, self.wx, self.wy = DECAY * self.w + 1, DECAY * self.wx + x, DECAY * self.wy + y
        self.wxx, self.wxy = DECAY * self.wxx + x * x, DECAY * self.wxy + x * y

    def fit(self, prior_a: float, prior_b: float, prior_x: float) -> tuple[float, float]:
        """(intercept, slope). Without measurements, the prior's; with them, the intercept is
        theirs and the slope is the ridge estimate b = (S_xy + lam * b0) / (S_xx + lam), where
        lam is PRIOR_STEPS steps' worth at prior_x from the mean."""
        if self.w < 1e-9:
            return prior_a, prior_b
        mx, my = self.wx / self.w, self.wy / self.w
        sxx, sxy = self.wxx - self.w * mx * mx, self.wxy - self.w * mx * my
        lam = PRIOR_STEPS * max(prior_x, 1.0) ** 2
        b = max(0.0, (sxy + lam * prior_b) / (max(sxx, 0.0) + lam))
        return max(1e-9, my - b * mx), b

    def predict(self, x: float, prior_a: float, prior_b: float, prior_x: float) -> float:
        a, b = self.fit(prior_a, prior_b, prior_x)
        return a + b * x

    @property
    def measured(self) -> float:
        """The measurements' total weight (about how many recent steps the fit rests on)."""
        return self.w


class StepTimes:
    """Lines per batch bucket for the target's decode steps and the draft's proposing."""

    def __init__(self) -> None:
        self.target: dict[int, Line] = {}
        self.draft: dict[int, Line] = {}

    def observe_step(self, batch: int, rows: int, seconds: float) -> None:
        self.target.setdefault(bucket(batch), Line()).add(rows, seconds)

    def observe_draft(self, batch: int, catch_up: int, seconds: float) -> None:
        self.draft.setdefault(bucket(batch), Line()).add(catch_up, seconds)

    def step_line(self, batch: int, prior_plain: float, prior_per_row: float) -> tuple[float, float]:
        """(plain step seconds, seconds per proposed row) at this batch size."""
        return self.target.get(bucket(batch), Line()).fit(prior_plain, prior_per_row, batch)

    def draft_line(self, batch: int, prior_fixed: float, prior_per_token: float, typical: int) -> tuple[float, float]:
        """(the draft's seconds to propose, seconds per token its mirrors catch up on)."""
        return self.draft.get(bucket(batch), Line()).fit(prior_fixed, prior_per_token, typical)

    def measured_steps(self, batch: int) -> float:
        line = self.target.get(bucket(batch))
        return 0.0 if line is None else line.measured
