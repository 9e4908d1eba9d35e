"""Whether the engine can serve a request: the one set of rules, shared by `LLMEngine.add_request`
and the server (which only turns the error into its 400 and names the field).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tokenmill.sampling_params import SamplingParams


class InvalidRequest(ValueError):
    """A request the engine cannot serve; `param` names the field at fault, `code` is the
    OpenAI error code where one applies (context_length_exceeded)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class RequestValidator:
    vocab_size: int
    max_model_len: int  # prompt plus output
    pool_tokens: int  # tokens the whole KV pool holds

    def room(self, ids: list[int]) -> int:
        """Output tokens the prompt leaves within max_model_len."""
        return max(0, self.max_model_len - len(ids))

    def check(self, ids: list[int], params: SamplingParams, max_tokens_must_fit: bool = False,
              prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> None:
        """Raise InvalidRequest unless the request could ever run. With max_tokens_must_fit (the
        OpenAI server's rule) a max_tokens beyond max_model_len is an error; without (the offline
        API, as in vLLM) the output just stops at max_model_len."""
        if not ids:
            raise InvalidRequest("the prompt is empty", prompt_param)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})", prompt_param)
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must lie in [0, {self.vocab_size})", "stop_token_ids")
        if params.logit_bias and any(t >= self.vocab_size for t in params.logit_bias):
            raise InvalidRequest(f"logit_bias token ids must lie in [0, {self.vocab_size})", "logit_bias")
        room = self.room(ids)
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; this model's maximum context length "
                                 f"(max_model_len) is {self.max_model_len} tokens (prompt plus at least one "
                                 "generated token)", prompt_param, "context_length_exceeded")
        if max_tokens_must_fit and params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequest(f"{max_tokens_param}={params.max_tokens} plus the prompt's {len(ids)} tokens "
                                 f"exceeds this model's maximum context length of {self.max_model_len} tokens",
                                 max_tokens_param, "context_length_exceeded")
        if len(ids) >= self.pool_tokens:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; the whole KV cache holds {self.pool_tokens}",
                                 prompt_param)
