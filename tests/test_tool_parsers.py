"""Hermes tool-call parsing: whole replies, streamed replies (against parse()), and the structural tag."""
from __future__ import annotations

import json
import logging
import random

import pytest

from tokenmill.structured.tool_parsers import (TOOL_PARSERS, HermesToolParser, ToolCallDelta, get_tool_parser)

P = HermesToolParser()


def call(name: str, args: str, ws: str = "\n") -> str:
    return f'<tool_call>{ws}{{"name": {json.dumps(name)}, "arguments": {args}}}{ws}</tool_call>'


# --- parse -------------------------------------------------------------------

def test_plain_text():
    assert P.parse("  Hello there.\n").content == "Hello there."
    assert P.parse("  Hello there.\n").tool_calls == []
    assert P.parse("").content is None and P.parse(" \n ").content is None


def test_one_call():
    r = P.parse(call("get_weather", '{"city": "Paris"}'))
    assert r.content is None
    [c] = r.tool_calls
    assert (c.name, c.arguments) == ("get_weather", '{"city": "Paris"}')
    assert c.id.startswith("chatcmpl-tool-")


def test_two_calls_with_text_before():
    text = "Let me check both.\n\n" + call("a", '{"x": 1}') + "\n" + call("b", '{ "y" : [1, {"z": null}] }')
    r = P.parse(text)
    assert r.content == "Let me check both."
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("a", '{"x": 1}'), ("b", '{ "y" : [1, {"z": null}] }')]
    assert r.tool_calls[0].id != r.tool_calls[1].id


@pytest.mark.parametrize("block", [
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>{"name": "f", "arguments": {"x": 1}} trailing</tool_call>',
    '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',  # arguments not an object
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f"}</tool_call>',
    '<tool_call>[1, 2]</tool_call>',
])
def test_malformed_block_is_content(block):
    r = P.parse("before " + block + " " + call("ok", "{}"))
    assert r.content == "before " + block
    assert [c.name for c in r.tool_calls] == ["ok"]


def test_cut_off_block():
    r = P.parse('Sure. <tool_call>\n{"name": "f", "arguments": {"a": "b"}}\n')
    assert r.content == "Sure." and [(c.name, c.arguments) for c in r.tool_calls] == [("f", '{"a": "b"}')]
    cut = 'Sure. <tool_call>\n{"name": "f", "arguments": {"a": "b'
    assert P.parse(cut).content == cut and P.parse(cut).tool_calls == []


def test_parameters_synonym_and_key_order():
    r = P.parse('<tool_call>{"parameters": {"q": 1}, "name": "search"}</tool_call>')
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("search", '{"q": 1}')]


def test_unicode_and_escapes_kept_verbatim():
    args = '{"q": "caf\\u00e9 \\"quoted\\" ünï 日本 </tool_ca \\\\ }{", "n": -1.5e3}'
    [c] = P.parse(call("search", args)).tool_calls
    assert c.arguments == args
    assert json.loads(c.arguments) == {"q": 'café "quoted" ünï 日本 </tool_ca \\ }{', "n": -1500.0}


def test_registry():
    assert TOOL_PARSERS["hermes"] is HermesToolParser
    assert isinstance(get_tool_parser("hermes"), HermesToolParser)
    with pytest.raises(ValueError, match="'nope'.*hermes"):
        get_tool_parser("nope")


# --- streaming ---------------------------------------------------------------

def stream(text: str, pieces: list[str]):
    st = P.streamer()
    content, deltas = [], []
    for piece in pieces:
        c, d = st.feed(piece)
        content.append(c)
        deltas += d
    c, d = st.finish()
    return "".join(content + [c]), deltas, st


def check_stream(text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    content, deltas, st = stream(text, pieces)
    want = P.parse(text)
    assert content == (want.content or ""), (text, pieces)
    by_index: dict[int, list[ToolCallDelta]] = {}
    for d in deltas:
        by_index.setdefault(d.index, []).append(d)
    assert sorted(by_index) == list(range(len(want.tool_calls))), (text, pieces)
    for i, w in enumerate(want.tool_calls):
        first, *rest = by_index[i]
        assert first.id is not None and first.name == w.name
        assert all(d.id is None and d.name is None for d in rest)
        assert "".join(d.arguments for d in by_index[i]) == w.arguments, (text, pieces)
        assert (st.calls[i].id, st.calls[i].name, st.calls[i].arguments) == (first.id, w.name, w.arguments)
    assert len(st.calls) == len(want.tool_calls)


TEXTS = ["Hello", " world.\n", "\n\n", "<", "<tool", "a < b <tool_c", "</tool_call>", " 日本 ", "{", "}"]
CALLS = [
    call("get_weather", '{"city": "Paris"}'),
    call("f", "{}", ws=""),
    call("g", '{"s": "} ] { \\" \\\\", "l": [{"a": {}}, []], "t": "</tool_c"}', ws=" \n "),
    call("ünï", '{\n  "x": "caf\\u00e9"\n}'),
    '<tool_call>\n{ "name" : "h" ,\n "parameters" :{"k": true}  }\n</tool_call>',
    '<tool_call>{"arguments": {"b": 2}, "name": "later"}</tool_call>',  # keys out of order: sent whole
    '<tool_call>{"name": "i", "arguments": {"c": 3}, "id": "x"}</tool_call>',  # an extra key after
]
BAD = ["<tool_call>not json</tool_call>", '<tool_call>{"arguments": 1, "name": "x"}</tool_call>',
       '<tool_call>{"name": "f\\q", "arguments": {}}</tool_call>', "<tool_call></tool_call>"]
TAILS = ["", call("end", '{"z": 0}')[:-len("</tool_call>")], "<tool_call>oops", "<tool_call", " \n"]


def random_splits(text: str, rng: random.Random, n: int):
    yield list(text)  # one character at a time
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def test_stream_matches_parse_on_random_splits():
    rng = random.Random(1234)
    for _ in range(300):
        parts = [rng.choice(rng.choice([TEXTS, TEXTS, CALLS, BAD])) for _ in range(rng.randint(0, 6))]
        text = "".join(parts) + rng.choice(TAILS)
        for pieces in random_splits(text, rng, 8):
            check_stream(text, pieces)


def test_stream_sends_early():
    st = P.streamer()
    assert st.feed("Checking <tool_c") == ("Checking", [])  # the tag's start and the space are held
    assert st.feed('all>\n{"name": "get_weather", "arguments": ') == ("", [])  # wait to see the value's "{"
    content, [head, brace] = st.feed("{")
    assert content == "" and (head.index, head.name, head.arguments) == (0, "get_weather", "") and head.id
    assert (brace.index, brace.id, brace.name, brace.arguments) == (0, None, None, "{")
    assert st.feed('"city": "Par') == ("", [ToolCallDelta(0, arguments='"city": "Par')])
    _, deltas = st.feed('is"}}\n</tool')  # the value's end is known by its braces; the rest is held
    assert [d.arguments for d in deltas] == ['is"}']
    assert st.feed("_call>") == ("", []) and st.finish() == ("", [])
    assert st.calls[0].arguments == '{"city": "Paris"}' and st.calls[0].id == head.id


def test_stream_header_then_bad_block_warns(caplog):
    text = 'Hi <tool_call>{"name": "f", "arguments": {"a": 1}} junk</tool_call> after'
    with caplog.at_level(logging.WARNING, logger="tokenmill.structured.tool_parsers"):
        content, deltas, st = stream(text, [text[:text.index(" junk")], text[text.index(" junk"):]])
    assert "does not parse" in caplog.text
    assert content == "Hi  after" and [c.name for c in st.calls] == ["f"]
    assert P.parse(text).tool_calls == []  # the documented limitation: parse() keeps it as text


# --- structural tag ----------------------------------------------------------

xgr = pytest.importorskip("xgrammar")

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.fixture(scope="module")
def tok():
    from tokenmill.tokenizer import load_tokenizer
    return load_tokenizer("tokenmill/demo_model")


@pytest.fixture(scope="module")
def info(tok):
    return xgr.TokenizerInfo.from_huggingface(tok)


@pytest.fixture(scope="module")
def compiler(info):
    return xgr.GrammarCompiler(info)


def accepts(compiler, tag: dict, text: str) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(xgr.Grammar.from_structural_tag(json.dumps(tag))),
                                 terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_completed()


WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
NOW = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def test_structural_tag_required(compiler):
    tag = P.structural_tag(TOOLS, "required")
    assert tag["type"] == "structural_tag" and json.loads(json.dumps(tag)) == tag
    for text, want in [(WEATHER, [("get_weather", {"city": "Paris", "days": 2})]), (NOW, [("now", {})]),
                       (WEATHER + "\n" + NOW, [("get_weather", {"city": "Paris", "days": 2}), ("now", {})])]:
        assert accepts(compiler, tag, text), text
        got = P.parse(text)
        assert got.content is None and [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == want
    assert not accepts(compiler, tag, "Sure! " + WEATHER)  # no free text
    assert not accepts(compiler, tag, "")  # at least one call
    assert not accepts(compiler, tag, WEATHER.replace('"Paris"', "3"))  # city must be a string
    assert not accepts(compiler, tag, WEATHER.replace('"city": "Paris", ', ""))  # city is required
    assert not accepts(compiler, tag, NOW.replace("{}", '{"x": 1}'))  # no parameters: only {}
    assert not accepts(compiler, tag, WEATHER.replace("get_weather", "other"))


def test_structural_tag_named(compiler):
    tag = P.structural_tag(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert accepts(compiler, tag, WEATHER)
    assert not accepts(compiler, tag, NOW)  # another function
    assert not accepts(compiler, tag, WEATHER + "\n" + WEATHER)  # exactly one call
    [c] = P.parse(WEATHER).tool_calls
    assert (c.name, json.loads(c.arguments)) == ("get_weather", {"city": "Paris", "days": 2})
    with pytest.raises(ValueError, match="'missing'.*get_weather, now"):
        P.structural_tag(TOOLS, {"type": "function", "function": {"name": "missing"}})
    with pytest.raises(ValueError, match="not constrained"):
        P.structural_tag(TOOLS, "none")
    with pytest.raises(ValueError, match="at least one"):
        P.structural_tag([], "required")


def test_structural_tag_auto_frees_the_text_and_holds_the_calls(compiler):
    tag = P.structural_tag(TOOLS, "auto")
    assert accepts(compiler, tag, "Just text, no call.")
    assert accepts(compiler, tag, "Let me check. " + WEATHER)
    assert not accepts(compiler, tag, "Let me check. " + WEATHER.replace('"Paris"', "3"))  # a call follows its schema
    single = P.structural_tag(TOOLS, "auto", parallel=False)
    assert not accepts(compiler, single, WEATHER + " and " + NOW)


def test_structural_tag_generated_text_parses_back(compiler, info, tok):
    """Walk the grammar token by token (a random allowed token each step, later preferring ones that
    close strings and objects) and check that the text it lets through parses back to its calls."""
    import torch
    vocab = info.vocab_size
    pieces = [tok.decode([i]) for i in range(vocab)]
    closes = torch.tensor([any(ch in p for ch in '"}<\n') for p in pieces])
    tag = P.structural_tag(TOOLS, "required")
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(json.dumps(tag)), terminate_without_stop_token=True)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    gen = torch.Generator().manual_seed(0)
    ids: list[int] = []
    for step in range(300):
        if matcher.is_completed():
            break
        matcher.fill_next_token_bitmask(bitmask)
        logits = torch.zeros(1, vocab)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        allowed = torch.isfinite(logits[0])
        if step > 12 and (allowed & closes).any():
            allowed &= closes
        choice = allowed.nonzero()[:, 0]
        ids.append(int(choice[torch.randint(len(choice), (1,), generator=gen)]))
        assert matcher.accept_token(ids[-1])
    assert matcher.is_completed()
    text = tok.decode(ids)
    r = P.parse(text)
    assert r.content is None and r.tool_calls and len(r.tool_calls) == text.count("<tool_call>")
    for c in r.tool_calls:
        assert c.name in {"get_weather", "now"} and isinstance(json.loads(c.arguments), dict)
