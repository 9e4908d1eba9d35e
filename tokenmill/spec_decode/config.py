"""`--speculative-config` / `LLM(speculative_config=...)`: vLLM's names and meaning.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"model": "/path/to/draft", "num_speculative_tokens": 4}          # method "draft_model"
    {"method": "auto", "num_speculative_tokens": 4, ...}              # ngram (or "model") when it pays
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

METHODS = ("ngram", "draft_model", "auto")


@dataclass
class SpeculativeConfig:
    num_speculative_tokens: int
    method: Optional[str] = None  # None: "draft_model" when a model is given, else an error
    model: Optional[str] = None  # the draft checkpoint (same tokenizer as the target)
    # n-gram prompt lookup: the longest suffix of min..max tokens that occurred earlier in the
    # sequence proposes the tokens that followed it. As in vLLM: neither given is 5 and 5, one
    # given sets both.
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in 1..16; got {k!r}")
        if self.method is None:
            if self.model is None:
                raise ValueError('speculative_config needs "method" ("ngram", "auto") or a draft "model"')
            self.method = "draft_model"
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise ValueError('method "draft_model" needs "model": the draft checkpoint')
        if self.method == "ngram" and self.model is not None:
            raise ValueError('method "ngram" takes no "model" (use "draft_model", or "auto" with a model)')
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if self.uses_ngram:
            if lo is None and hi is None:
                lo = hi = 5
            lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
            for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
            if lo > hi:
                raise ValueError(f"prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
            self.prompt_lookup_min, self.prompt_lookup_max = lo, hi
        elif lo is not None or hi is not None:
            raise ValueError("prompt_lookup_min/max apply to the ngram proposer only")

    @property
    def uses_ngram(self) -> bool:
        return self.method == "ngram" or (self.method == "auto" and self.model is None)

    @property
    def switches(self) -> bool:
        """Whether each step decides from the roofline if speculating pays."""
        return self.method == "auto"

    @classmethod
    def parse(cls, value: Union[None, str, dict[str, Any], "SpeculativeConfig"]) -> Optional["SpeculativeConfig"]:
        """From the flag's JSON text, a dict, or an instance; None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"--speculative-config must be a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object; got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return cls(**value)
