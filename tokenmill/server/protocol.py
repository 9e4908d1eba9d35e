"""Request bodies of the OpenAI API (and vLLM's extras), and their translation to SamplingParams."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant")


class BadRequest(InvalidRequest):
    """A request the server understood but cannot serve; carries the parameter at fault and the
    status (400, or 404 for an unknown model)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400) -> None:
        super().__init__(message, param, code)
        self.status = status


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of the OpenAI API (and vLLM's extras) that do not change the output: accepted, so that
# existing clients and frameworks keep working.
_NO_EFFECT = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "request_id", "priority"}
# Fields that would change the output and that tokenmill does not honour yet: refused by name.
_NOT_HONOURED = {"logit_bias", "suffix", "audio", "modalities", "prediction", "tools", "tool_choice", "functions",
                 "function_call", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern", "reasoning_effort",
                 "web_search_options", "use_beam_search", "length_penalty", "prompt_logprobs", "add_special_tokens",
                 "truncate_prompt_tokens", "allowed_token_ids", "bad_words", "min_tokens_ratio", "logits_processors"}


class _SamplingFields(BaseModel):
    # Extra fields are kept so that check_fields() can refuse them by name: a field that would
    # change the output is never silently ignored.
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    best_of: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None

    def check_fields(self) -> None:
        """400 for a field tokenmill would otherwise ignore: one it does not honour, or one
        unknown to both the OpenAI API and vLLM's extras."""
        for name, value in (self.model_extra or {}).items():
            if name in _NO_EFFECT:
                continue
            if name in _NOT_HONOURED:
                if name == "tool_choice" and value == "none" and not (self.model_extra or {}).get("tools"):
                    continue  # asks for no tool call, which is what happens
                raise BadRequest(f"{name!r} is not supported by this server yet", param=name, code="unsupported_field")
            raise BadRequest(f"unknown field {name!r}", param=name, code="unknown_field")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest(f"best_of={self.best_of} is not supported (only best_of equal to n)", param="best_of")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise BadRequest(f"response_format {self.response_format.get('type')!r} is not supported yet (only 'text')",
                             param="response_format", code="unsupported_field")

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                # The engine sends only what is new each step; the handler accumulates it.
                output_kind=RequestOutputKind.DELTA)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise BadRequest(str(e), param=param if param.isidentifier() else None) from e


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)

    def conversation(self) -> list[dict[str, str]]:
        if not self.messages:
            raise BadRequest("messages must contain at least one message", param="messages")
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in CHAT_ROLES:
                raise BadRequest(f"messages[{i}].role {m.role!r} is not one of {', '.join(CHAT_ROLES)}",
                                 param="messages")
            out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
        return out
