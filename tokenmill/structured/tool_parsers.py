"""Tool-call parsers: split a model's reply into content and tool calls, whole or streamed, and build
the xgrammar structural tag that makes the model write calls in its format. Only the Hermes / Qwen2.5
format for now (vLLM's `--tool-call-parser hermes`): free text and blocks of
`<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>`."""
from __future__ import annotations

import json
import logging
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

logger = logging.getLogger(__name__)


@dataclass
class ToolCall:
    name: str
    arguments: str  # the arguments object as the JSON text the model wrote (a JSON object)
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")


@dataclass
class ParsedReply:
    content: Optional[str]  # the text outside the tool-call blocks, stripped; None when empty
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """One streamed fragment of a tool call, as OpenAI streams them."""
    index: int  # which call (0, 1, ...) of the reply
    id: Optional[str] = None  # set (with name) on a call's first fragment only
    name: Optional[str] = None
    arguments: str = ""  # the next fragment of the arguments JSON text


class ToolCallStreamer(ABC):
    calls: list[ToolCall]  # the calls streamed so far, with the ids their deltas carried

    @abstractmethod
    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """The content text and tool-call fragments that can be sent now, for `delta` (new reply text)."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Whatever was held back, at the end of the reply."""


class ToolParser(ABC):
    name: ClassVar[str]

    @abstractmethod
    def parse(self, text: str) -> ParsedReply: ...
    @abstractmethod
    def streamer(self) -> ToolCallStreamer: ...
    @abstractmethod
    def structural_tag(self, tools: list[dict], tool_choice: Union[str, dict], parallel: bool = True) -> dict: ...


# -----------------------------------------------------------------------------
# Hermes

START, END = "<tool_call>", "</tool_call>"
_ARG_KEYS = ("arguments", "parameters")  # some models write "parameters"
_DECODER = json.JSONDecoder()
# a block's opening up to (not past) the "{" of the arguments value. Waiting for that "{" means a
# value that is not an object (which cannot parse) never gets a header streamed.
_HEADER = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"name"[ \t\n\r]*:[ \t\n\r]*"((?:[^"\\]|\\.)*)"[ \t\n\r]*,'
                     r'[ \t\n\r]*"(?:arguments|parameters)"[ \t\n\r]*:[ \t\n\r]*(?=\{)')


def _skip_ws(s: str, i: int) -> int:
    # JSON's whitespace, not str.isspace()'s, so that offsets agree with json's
    while i < len(s) and s[i] in " \t\n\r":
        i += 1
    return i


def _parse_block(body: str) -> Optional[tuple[str, str]]:
    """(name, arguments text) of a block's body (the text between the tags), or None unless it is
    one JSON object with a string "name" and an object "arguments"/"parameters". Of duplicate keys
    the first counts (json.loads keeps the last): it is the one the streamer sees first."""
    pos = _skip_ws(body, 0)
    try:
        obj, end = _DECODER.raw_decode(body, pos)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or _skip_ws(body, end) != len(body):
        return None
    # valid JSON: walk its top level again for the span of text of each value
    found: dict[str, tuple[Any, int, int]] = {}
    i = _skip_ws(body, pos + 1)
    while body[i] != "}":
        key, i = _DECODER.raw_decode(body, i)
        i = _skip_ws(body, _skip_ws(body, i) + 1)  # past the ":"
        value, j = _DECODER.raw_decode(body, i)
        found.setdefault(key, (value, i, j))
        i = _skip_ws(body, j)
        i = _skip_ws(body, i + 1) if body[i] == "," else i
    name = found.get("name", (None, 0, 0))[0]
    args = next((found[k] for k in found if k in _ARG_KEYS), None)
    if not isinstance(name, str) or args is None or not isinstance(args[0], dict):
        return None
    return name, body[args[1]:args[2]]


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


@dataclass
class _Block:
    """The streamer's state inside one <tool_call> block."""
    body: str = ""  # the text after <tool_call> so far
    call: Optional[ToolCall] = None  # set once the header was streamed; .arguments = what was sent
    args_at: int = 0  # where the arguments value starts in body
    end: int = -1  # where the value ends, once seen
    scanned: int = 0  # how far the value was scanned for its end, and the scanner's state there
    depth: int = 0
    in_str: bool = False
    esc: bool = False


class HermesToolCallStreamer(ToolCallStreamer):
    """Streams a Hermes reply. For any text and any split of it into deltas, unless a block whose
    header was streamed later fails to parse (below):
      - "".join(content of every feed() and finish()) == parse(text).content or "", exactly: the
        stream drops leading whitespace and holds whitespace back until non-whitespace content
        follows, so it strips as parse() does;
      - for call i, "".join(arguments of its deltas) == parse(text).tool_calls[i].arguments, its
        first delta (and only that one) carries its id and tool_calls[i].name, and calls[i] has that id.
    Limitation: a call's id and name are sent once `{"name": ..., "arguments": {` is seen, and the
    arguments as they come. Sent text cannot be taken back, so if the block then fails to parse (cut
    off, bad JSON, junk after the object, an end tag inside a string) a warning is logged, the call
    stays as streamed (in `calls` too) and the rest of the block is dropped, where parse() would have
    kept the whole block as content."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._held = ""  # outside a block: text held back as it may start a <tool_call>
        self._block: Optional[_Block] = None
        self._ws = ""  # content whitespace held back
        self._started = False  # any non-whitespace content sent yet

    def _content(self, s: str) -> str:
        s = self._ws + s if self._started else s.lstrip()
        kept = s.rstrip()
        self._ws, self._started = s[len(kept):], self._started or bool(kept)
        return kept

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        text = self._held + delta  # what is not yet placed, outside or inside a block
        self._held = ""
        while True:
            if self._block is None:
                s = text.find(START)
                if s < 0:
                    keep = _held_prefix(text, START)
                    content.append(self._content(text[:len(text) - keep]))
                    self._held = text[len(text) - keep:]
                    break
                content.append(self._content(text[:s]))
                self._block, text = _Block(), text[s + len(START):]
            block = self._block
            seen = max(0, len(block.body) - len(END) + 1)  # an end tag before this would have been found
            block.body += text
            e = block.body.find(END, seen)
            if e < 0:
                deltas += self._stream_args(block)
                break
            text, block.body = block.body[e + len(END):], block.body[:e]
            c, d = self._end_block(closed=True)
            content.append(c)
            deltas += d
        return "".join(content), deltas

    def _stream_args(self, block: _Block) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if block.call is None:
            m = _HEADER.match(block.body)
            try:
                name = json.loads(f'"{m.group(1)}"') if m else None
            except ValueError:
                name = None  # a bad escape: the block cannot parse, so it waits for its end
            if m is None or name is None:
                return out
            block.call, block.args_at = ToolCall(name, ""), m.end()
            out.append(ToolCallDelta(len(self.calls), block.call.id, name, ""))
        # a brace/string scanner finds where the value ends: the outer "}" and the end tag after it
        # must not be sent as arguments (and any text between, as in an extra key, is not arguments)
        body, i = block.body, max(block.scanned, block.args_at)
        while i < len(body) and block.end < 0:
            c = body[i]
            if block.esc:
                block.esc = False
            elif block.in_str:
                block.esc, block.in_str = c == "\\", c != '"'
            elif c == '"':
                block.in_str = True
            elif c in "{[]}":
                block.depth += 1 if c in "{[" else -1
                block.end = i + 1 if block.depth == 0 else -1
            i += 1
        block.scanned = i
        # until the value ends, hold back what may be an end tag coming (inside a string, so the
        # block will not parse, but there is no sending it back)
        ready = body[block.args_at:block.end if block.end >= 0 else len(body) - _held_prefix(body, END)]
        if len(ready) > len(block.call.arguments):
            out.append(ToolCallDelta(len(self.calls), arguments=ready[len(block.call.arguments):]))
            block.call.arguments = ready
        return out

    def _end_block(self, closed: bool) -> tuple[str, list[ToolCallDelta]]:
        assert self._block is not None
        block, index, self._block = self._block, len(self.calls), None
        parsed = _parse_block(block.body)
        if block.call is None:
            if parsed is None:  # nothing of it was sent: it is plain text after all, as in parse()
                return self._content(START + block.body + (END if closed else "")), []
            self.calls.append(ToolCall(*parsed))
            return "", [ToolCallDelta(index, self.calls[-1].id, parsed[0], parsed[1])]
        call, sent = block.call, block.call.arguments
        self.calls.append(call)
        if parsed is None or not parsed[1].startswith(sent):
            logger.warning("tool call %d (%s) was streamed but its block does not parse; dropped the rest: %r",
                           index, call.name, block.body[:200])
            return "", []
        call.arguments = parsed[1]
        return "", [ToolCallDelta(index, arguments=parsed[1][len(sent):])] if parsed[1] != sent else []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if self._block is not None:  # cut off in a block (max_tokens): parse() tries it to the end too
            content, deltas = self._end_block(closed=False)
        else:
            content, deltas = self._content(self._held), []
        self._held, self._ws = "", ""  # trailing whitespace is dropped, as parse() strips it
        return content, deltas


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str) -> ParsedReply:
        pieces: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while (s := text.find(START, pos)) >= 0:
            pieces.append(text[pos:s])
            e = text.find(END, s + len(START))
            body_end, pos = (e, e + len(END)) if e >= 0 else (len(text), len(text))
            parsed = _parse_block(text[s + len(START):body_end])
            if parsed is None:  # never raise on model output: a bad block is just text
                pieces.append(text[s:pos])
            else:
                calls.append(ToolCall(*parsed))
        pieces.append(text[pos:])
        return ParsedReply("".join(pieces).strip() or None, calls)

    def streamer(self) -> ToolCallStreamer:
        return HermesToolCallStreamer()

    def structural_tag(self, tools: list[dict], tool_choice: Union[str, dict], parallel: bool = True) -> dict:
        """An xgrammar structural tag ({"type": "structural_tag", "format": ...}) for tool_choice
        "required" (one or more calls of the listed functions separated by "\\n", and no other text;
        exactly one unless parallel), "auto" (any text, and calls that follow their schemas), or
        {"type": "function", "function": {"name": f}} (exactly one call of f)."""
        tags: dict[str, dict] = {}
        for tool in tools:
            fn = tool.get("function", {})
            if tool.get("type", "function") != "function" or "name" not in fn:
                continue
            # OpenAI: no parameters (clients also send {}) is an empty parameter list, so only {}; said
            # explicitly, as xgrammar lets a bare {"type": "object"} hold any properties
            schema = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
            begin = f'{START}\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": '
            # At most one whitespace character between JSON tokens: free whitespace lets a model pad
            # the arguments with newlines until max_tokens runs out (the demo model does).
            tags[fn["name"]] = {"type": "tag", "begin": begin, "end": "}\n" + END,
                                "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}}
        if tool_choice == "required":
            if not tags:
                raise ValueError('tool_choice "required" needs at least one function tool')
            fmt = {"type": "tags_with_separator", "tags": list(tags.values()), "separator": "\n",
                   "at_least_one": True, "stop_after_first": not parallel}
        elif tool_choice == "auto":
            # Free text, but a call, once begun, follows its function's schema (OpenAI's strict).
            fmt = {"type": "triggered_tags", "triggers": [START], "tags": list(tags.values()),
                   "stop_after_first": not parallel}
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            name = tool_choice.get("function", {}).get("name")
            if name not in tags:
                raise ValueError(f"tool_choice names function {name!r}, which is not among the tools "
                                 f"({', '.join(tags) or 'none'})")
            fmt = tags[name]
        else:
            raise ValueError(f'tool_choice {tool_choice!r} is not constrained: only "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}} have a structural tag')
        return {"type": "structural_tag", "format": fmt}


TOOL_PARSERS: dict[str, type[ToolParser]] = {HermesToolParser.name: HermesToolParser}


def get_tool_parser(name: str) -> ToolParser:
    """A parser by its vLLM `--tool-call-parser` name."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()
