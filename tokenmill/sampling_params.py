"""Sampling parameters, mirroring vLLM's `SamplingParams` names and defaults."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from tokenmill.structured.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a running request carries (vLLM's names)."""

    CUMULATIVE = 0  # everything so far, every step
    DELTA = 1  # only what is new since the previous output (streams)
    FINAL_ONLY = 2  # nothing until the request finishes (LLM.generate)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Args:
        n: completions per prompt.
        temperature: 0 means greedy.
        top_p, top_k, min_p: nucleus, top-k (0 or -1: off) and min-p filtering.
        repetition_penalty: HF-style, over prompt and output tokens (1: off).
        presence_penalty, frequency_penalty: OpenAI-style, over output tokens (0: off).
        seed: per-request seed; the same seed gives the same output whatever else is in the batch.
        max_tokens: most tokens to generate (None: until max_model_len).
        min_tokens: EOS and stop_token_ids are masked until this many tokens exist.
        stop: strings that end generation; cut from the text unless include_stop_str_in_output.
        stop_token_ids: token ids that end generation (kept in token_ids, not in the text).
        ignore_eos: keep generating past EOS.
        logprobs: top-N logprobs per generated token (the sampled token is always included).
        prompt_logprobs: top-N logprobs per prompt token.
        output_kind: CUMULATIVE (default), DELTA or FINAL_ONLY: DELTA and FINAL_ONLY spare the
            engine rebuilding every request's whole output each step.
        structured_outputs: a grammar the output must follow (JSON schema, regex, choice, EBNF).
        logit_bias: token id -> bias in [-100, 100] added to its logit before sampling (OpenAI's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Optional[StructuredOutputsParams] = None
    logit_bias: Optional[dict[int, float]] = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:  # vLLM's older spelling of "off"
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise bad(name, "a finite number")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "a number >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 or -1 disables it)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "a RequestOutputKind")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad("structured_outputs", "a StructuredOutputsParams")
            if self.min_tokens:
                # The grammar decides where the output ends; holding back EOS could leave no token.
                raise ValueError("min_tokens cannot be combined with structured_outputs")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
                    for t, b in self.logit_bias.items()):
                raise bad("logit_bias", "a dict of token id (>= 0) to a bias in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise bad(name, "an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
