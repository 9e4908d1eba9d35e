"""Request bodies of the OpenAI API (and vLLM's extras), and their translation to SamplingParams."""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.structured.params import StructuredOutputsParams

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(InvalidRequest):
    """A request the server understood but cannot serve; carries the parameter at fault and the
    status (400, or 404 for an unknown model)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400) -> None:
        super().__init__(message, param, code)
        self.status = status


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # e.g. vLLM's continuous_usage_stats: refused, not ignored

    include_usage: bool = False


# Fields of the OpenAI API (and vLLM's extras) that do not change the output: accepted, so that
# existing clients and frameworks keep working.
_NO_EFFECT = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "request_id", "priority"}
# Fields that would change the output and that tokenmill does not honour yet: refused by name.
_NOT_HONOURED = {"suffix", "audio", "modalities", "prediction", "functions", "function_call",
                 "guided_whitespace_pattern", "reasoning_effort", "web_search_options", "use_beam_search",
                 "length_penalty", "prompt_logprobs", "add_special_tokens", "truncate_prompt_tokens",
                 "allowed_token_ids", "bad_words", "min_tokens_ratio", "logits_processors"}
# vLLM's older spellings of structured_outputs' keys.
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_BACKENDS = ("auto", "xgrammar")


class JsonSchemaFormat(BaseModel):
    name: str
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


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
    # vLLM's extension: with --scheduling-policy priority, lower runs first (and may preempt).
    priority: int = 0
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
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None

    def check_fields(self) -> None:
        """400 for a field tokenmill would otherwise ignore: one it does not honour, or one
        unknown to both the OpenAI API and vLLM's extras."""
        for name, value in (self.model_extra or {}).items():
            if name in _NO_EFFECT:
                continue
            if name in _NOT_HONOURED:
                raise BadRequest(f"{name!r} is not supported by this server yet", param=name, code="unsupported_field")
            raise BadRequest(f"unknown field {name!r}", param=name, code="unknown_field")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest(f"best_of={self.best_of} is not supported (only best_of equal to n)", param="best_of")
        if self.guided_decoding_backend is not None and self.guided_decoding_backend not in _BACKENDS:
            raise BadRequest(f"guided_decoding_backend {self.guided_decoding_backend!r} is not available: this "
                             "server's grammar engine is xgrammar", param="guided_decoding_backend")

    def structured(self) -> Optional[tuple[StructuredOutputsParams, str]]:
        """The output constraint the request asks for, and the field that asked (for errors)."""
        asked: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise BadRequest("response_format of type json_schema needs a json_schema", param="response_format")
            schema = rf.json_schema.json_schema
            asked.append(("response_format", {"json": schema} if schema is not None else {"json_object": True}))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", self.structured_outputs))
        for name, key in _GUIDED.items():
            if getattr(self, name) is not None:
                asked.append((name, {key: getattr(self, name)}))
        if not asked:
            return None
        if len(asked) > 1:
            raise BadRequest(f"give one output constraint, not {' and '.join(n for n, _ in asked)}",
                             param=asked[1][0])
        source, fields = asked[0]
        try:
            return StructuredOutputsParams(**fields), source
        except (TypeError, ValueError) as e:  # TypeError: a key StructuredOutputsParams does not have
            message = str(e).replace("StructuredOutputsParams.__init__()", "structured_outputs")
            raise BadRequest(message.replace("structured_outputs", source, 1) if source != "structured_outputs"
                             else message, param=source) from e

    def token_bias(self) -> Optional[dict[int, float]]:
        """logit_bias with its keys (token ids written as JSON strings) as integers."""
        if self.logit_bias is None:
            return None
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError as e:
            raise BadRequest("logit_bias keys must be token ids", param="logit_bias") from e

    def sampling_params(self, max_tokens: int, logprobs: Optional[int],
                        structured: Optional[StructuredOutputsParams] = None,
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
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
                structured_outputs=structured, logit_bias=self.token_bias(), prompt_logprobs=prompt_logprobs,
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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    # Extra fields are kept so that a set one can be refused by name (see ChatCompletionRequest).
    model_config = ConfigDict(extra="allow")

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[MessageToolCall]] = None
    tool_call_id: Optional[str] = None

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


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; none: the function takes no arguments
    strict: Optional[bool] = None  # the schema is always enforced when the call is (tool_choice)

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        # A call's arguments are a JSON object, in every tool-call format.
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of type object")
        return v


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None  # False: at most one call per reply

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as chat templates take them (transformers' convention: a tool call's
        arguments as a dict, a tool result with the name of the function it answers)."""
        if not self.messages:
            raise BadRequest("messages must contain at least one message", param="messages")
        out: list[dict[str, Any]] = []
        names: dict[str, str] = {}  # tool call id -> function name, from earlier assistant turns
        for i, m in enumerate(self.messages):
            if m.role not in CHAT_ROLES:
                raise BadRequest(f"messages[{i}].role {m.role!r} is not one of {', '.join(CHAT_ROLES)}",
                                 param="messages")
            for key, value in (m.model_extra or {}).items():
                if value not in (None, [], {}, ""):  # what clients echo back from a reply (refusal: null)
                    raise BadRequest(f"messages[{i}].{key} is not supported", param="messages")
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls:
                if m.role != "assistant":
                    raise BadRequest(f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
                msg["tool_calls"] = []
                for j, call in enumerate(m.tool_calls):
                    try:
                        arguments = json.loads(call.function.arguments)
                    except ValueError as e:
                        raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}",
                                         param="messages") from e
                    if not isinstance(arguments, dict):
                        raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
                                         param="messages")
                    names[call.id] = call.function.name
                    msg["tool_calls"].append({"id": call.id, "type": "function", "function": {
                        "name": call.function.name, "arguments": arguments}})
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise BadRequest(f"messages[{i}]: a tool message needs tool_call_id", param="messages")
                msg["tool_call_id"] = m.tool_call_id
                if m.tool_call_id in names and "name" not in msg:
                    msg["name"] = names[m.tool_call_id]
            out.append(msg)
        return out


def request_fields() -> dict[str, Any]:
    """What each OpenAI route honours and accepts without effect, and what it refuses by name:
    /v1/models lists it, from the same sets the request check uses."""
    def route(model: type[BaseModel]) -> dict[str, list[str]]:
        declared = {f.alias or name for name, f in model.model_fields.items()}
        # `user` is declared (it is a string) but changes nothing; parallel_tool_calls changes chat.
        no_effect = _NO_EFFECT - (declared - {"user"})
        return {"honoured": sorted(declared - no_effect), "accepted_without_effect": sorted(no_effect)}

    return {"completions": route(CompletionRequest), "chat.completions": route(ChatCompletionRequest),
            "refused": sorted(_NOT_HONOURED)}
