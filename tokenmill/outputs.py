"""What the engine returns, mirroring vLLM's `RequestOutput` / `CompletionOutput`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Logprob:
    """One candidate token's log probability, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (the chosen token plus the top-N).
LogprobsList = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[LogprobsList]
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or None while running
    # The stop string or stop token id that ended it; with finish_reason "error", what went wrong.
    stop_reason: Optional[int | str] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = field(default=None, repr=False)
