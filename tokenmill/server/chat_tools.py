"""Tool calling on /v1/chat/completions: what a request's `tools` and `tool_choice` ask of the
chat template, the grammar and the reply parser; and the reply as a message, whole or streamed.

vLLM's rules: "auto" (the default when tools are given) needs the server started with
--enable-auto-tool-choice and a --tool-call-parser, and the model decides whether to call;
"required" and a named function are enforced with a grammar in the parser's format, so the call
always parses and its arguments follow the function's schema; "none" shows the model no tools.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.server.protocol import BadRequest, ChatCompletionRequest
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.tool_parsers import TOOL_PARSERS, ToolCallDelta, ToolCallStreamer, ToolParser, get_tool_parser

DEFAULT_PARSER = "hermes"


@dataclass(frozen=True)
class ToolSettings:
    """The server's tool-calling flags (vLLM's names)."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"--tool-call-parser {self.tool_call_parser!r} is not one of {', '.join(TOOL_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass
class ToolPlan:
    template_tools: Optional[list[dict[str, Any]]] = None  # shown to the model by its chat template
    parser: Optional[ToolParser] = None  # reads tool calls out of the reply
    structured: Optional[StructuredOutputsParams] = None  # the grammar of a required / named call
    parallel: bool = True  # parallel_tool_calls: False keeps only a reply's first call


def plan_tools(body: ChatCompletionRequest, settings: ToolSettings) -> ToolPlan:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    parallel = body.parallel_tool_calls is not False
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise BadRequest("tools: function names must be unique", param="tools")
    if choice == "none":
        return ToolPlan()
    if choice is None or choice == "auto":
        if not settings.enable_auto_tool_choice:
            raise BadRequest('"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                             "--tool-call-parser", param="tool_choice")
        parser = get_tool_parser(settings.tool_call_parser)
        # A strict function's calls follow its schema; the rest of the reply stays free.
        strict = any(t.function.strict for t in body.tools)
        tag = StructuredOutputsParams(structural_tag=parser.structural_tag(tools, "auto", parallel)) if strict else None
        return ToolPlan(tools, parser, tag, parallel)
    if body.stop:
        # A stop string would cut the call the grammar holds the reply to.
        what = choice if isinstance(choice, str) else "naming a function"
        raise BadRequest(f"stop cannot be combined with tool_choice {what}", param="stop")
    parser = get_tool_parser(settings.tool_call_parser or DEFAULT_PARSER)
    if choice == "required":
        tag = parser.structural_tag(tools, "required", parallel)
    else:
        if choice.function.name not in names:
            raise BadRequest(f"tool_choice names the function {choice.function.name!r}, which is not among the "
                             "tools", param="tool_choice")
        tag = parser.structural_tag(tools, choice.model_dump())
    return ToolPlan(tools, parser, StructuredOutputsParams(structural_tag=tag), parallel)


def _call_json(index: Optional[int], call_id: Optional[str], name: Optional[str], arguments: str) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    if call_id is not None:
        out.update(id=call_id, type="function")
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    out["function"] = function
    return out


def reply_message(text: str, finish_reason: Optional[str], plan: ToolPlan) -> tuple[dict[str, Any], Optional[str]]:
    """The assistant message of a whole reply and its finish_reason ("tool_calls" when it called)."""
    if plan.parser is None:
        return {"role": "assistant", "content": text}, finish_reason
    parsed = plan.parser.parse(text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    calls = parsed.tool_calls if plan.parallel else parsed.tool_calls[:1]
    if calls:
        message["tool_calls"] = [_call_json(None, c.id, c.name, c.arguments) for c in calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return message, finish_reason


class ReplyStream:
    """One choice's streamed deltas: text as content, or tool-call fragments as OpenAI streams
    them (a call's id, type and name first, then its arguments in pieces, indexed per call)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.streamer: Optional[ToolCallStreamer] = plan.parser.streamer() if plan.parser else None
        self.parallel = plan.parallel

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        if self.streamer is None:
            return {"content": text} if text else {}
        content, calls = self.streamer.feed(text) if text else ("", [])
        if finished:
            more, last = self.streamer.finish()
            content, calls = content + more, calls + last
        if not self.parallel:
            calls = [d for d in calls if d.index == 0]
        out: dict[str, Any] = {}
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = [_delta_json(d) for d in calls]
        return out

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        if reason == "stop" and self.streamer is not None and self.streamer.calls:
            return "tool_calls"
        return reason


def _delta_json(d: ToolCallDelta) -> dict[str, Any]:
    return _call_json(d.index, d.id, d.name, d.arguments)
