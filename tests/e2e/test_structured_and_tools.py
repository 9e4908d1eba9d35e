"""Structured outputs and tool calling through the official openai client, on the demo model
(which otherwise writes gibberish: every well-formed reply below is the grammar's doing)."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, for the next days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    colour: str = Field(pattern="^(red|green|blue)$")


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_parse_returns_a_parsed_pydantic_object(client):
    r = client.beta.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "A person"}],
                                           response_format=Person, max_tokens=80, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Person) and r.choices[0].finish_reason == "stop"


def test_json_object_and_json_schema_on_completions(client):
    r = client.chat.completions.create(model="demo", messages=ASK, response_format={"type": "json_object"},
                                       max_tokens=60, temperature=1.0, seed=4, n=4)
    assert all(c.message.content.startswith("{") for c in r.choices)
    assert any(c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict) for c in r.choices)
    schema = Person.model_json_schema()
    r = client.completions.create(model="demo", prompt="Name:", max_tokens=80, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


@pytest.mark.parametrize("field, value, check", [
    ("structured_outputs", {"choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
    ("structured_outputs", {"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
    ("structured_outputs", {"grammar": 'root ::= "<" [a-z]{1,5} ">"'}, lambda t: re.fullmatch("<[a-z]{1,5}>", t)),
    ("structured_outputs", {"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
     lambda t: isinstance(json.loads(t), list)),
    ("guided_choice", ["yes", "no"], lambda t: t in ("yes", "no")),
    ("guided_regex", "[A-Z]{4}", lambda t: re.fullmatch("[A-Z]{4}", t)),
    ("guided_grammar", 'root ::= ("ab" | "cd"){2}', lambda t: re.fullmatch("(ab|cd){2}", t)),
    ("guided_json", {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
     lambda t: json.loads(t)["ok"] in (True, False)),
])
def test_every_vllm_field(client, field, value, check):
    for stream in (False, True):
        kw = dict(model="demo", prompt="Answer:", max_tokens=40, temperature=0.8, seed=1, extra_body={field: value})
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kw)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert reason == "stop" and check(text), (text, reason)


@pytest.mark.parametrize("extra, part", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}},
     "#/properties/a: 'not' is not supported"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"structured_outputs": {"choice": []}}, "non-empty list"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.5}}}}}],
      "tool_choice": "required"}, "'multipleOf'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"guided_regex": "[^\\s\\S]"}, "guided_regex: the grammar matches no output"),
    ({"structured_outputs": {"structural_tag": {"type": "nonsense"}}}, "structured_outputs.structural_tag"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "parameters must be a JSON schema of type object"),
    ({"tools": [WEATHER], "tool_choice": "required", "stop": ["\n"]}, "stop cannot be combined"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": '"oops"'}}]}]}, "arguments must be a JSON object"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "cannot be combined"),
])
def test_a_constraint_the_engine_cannot_honour_is_a_400_naming_it(server, extra, part):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "demo", "messages": ASK, "max_tokens": 4,
                                                              **extra})
    assert r.status_code == 400, r.text
    assert part in r.json()["error"]["message"], r.json()
    assert httpx.get(f"{server.url}/health").status_code == 200


def _stream_calls(stream) -> tuple[str, dict[int, dict], str]:
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            call = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
            if t.id:
                assert call["id"] is None, "a call's id and name come once, on its first fragment"
                call["id"], call["name"] = t.id, t.function.name
            call["arguments"] += t.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content, calls, reason


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_enforced_tool_calls_parse_and_follow_the_schema(client, choice):
    kw = dict(model="demo", messages=ASK, tools=[WEATHER, ADD], tool_choice=choice, max_tokens=200,
              temperature=0.7, seed=2, parallel_tool_calls=False)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls, r
    for call in msg.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    assert len(msg.tool_calls) == 1  # parallel_tool_calls=False
    if isinstance(choice, dict):
        assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
    content, calls, reason = _stream_calls(client.chat.completions.create(stream=True, **kw))
    assert reason == "tool_calls" and content == (msg.content or "")
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in msg.tool_calls]


def test_auto_and_none(client):
    for choice in ("auto", "none"):
        kw = dict(model="demo", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=20, temperature=0)
        r = client.chat.completions.create(**kw)
        # The demo model never learned to call: "auto" gives its text, as a model that does not call would.
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
        content, calls, _ = _stream_calls(client.chat.completions.create(stream=True, **kw))
        assert content == r.choices[0].message.content and not calls


def test_auto_parses_a_call_the_model_writes(client):
    # A prompt that ends inside the call makes the model "write" one, as a tool-trained model would.
    r = client.completions.create(model="demo", prompt="x", max_tokens=1)  # the server is up
    assert r.choices
    from tokenmill.server.chat_tools import ToolPlan, reply_message
    from tokenmill.structured.tool_parsers import get_tool_parser

    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    message, reason = reply_message(text, "stop", ToolPlan(parser=get_tool_parser("hermes")))
    assert reason == "tool_calls" and message["content"] == "Let me look."
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_follow_up_turn_with_the_tool_result(client, server):
    first = client.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=120, temperature=0, parallel_tool_calls=False)
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="demo", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > first.usage.prompt_tokens
    # The tool's result reached the model through the template.
    from tokenmill.tokenizer import load_tokenizer
    tok = load_tokenizer("tokenmill/demo_model")
    rendered = tok.apply_chat_template([
        ASK[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                            "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}], tools=[WEATHER],
        add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in rendered
    assert r.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    with pytest.raises(BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="demo", max_tokens=2, messages=ASK + [{"role": "tool", "content": "x"}])


def test_logit_bias_and_echo(client):
    plain = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
    forced = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0,
                                       logit_bias={"77": 100})
    assert forced.choices[0].text != plain.choices[0].text and len(set(forced.choices[0].text)) == 1
    chat = client.chat.completions.create(model="demo", messages=ASK, max_tokens=3, temperature=0,
                                          logit_bias={"77": 100})
    assert chat.choices[0].message.content == forced.choices[0].text[:len(chat.choices[0].message.content)]
    echo = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0, echo=True, logprobs=1)
    assert echo.choices[0].text == "Hello" + plain.choices[0].text
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs) > 4
    assert "".join(lp.tokens) == echo.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt="Hello", max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == echo.choices[0].text
    with pytest.raises(BadRequestError, match="logit_bias"):
        client.completions.create(model="demo", prompt="x", max_tokens=2, logit_bias={"99999999": 1})


def test_models_list_the_fields_and_every_refused_one_is_a_400(server):
    fields = httpx.get(f"{server.url}/v1/models").json()["data"][0]["request_fields"]
    chat, completions = fields["chat.completions"], fields["completions"]
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format", "logit_bias"} <= set(chat["honoured"])
    assert {"echo", "structured_outputs", "guided_json"} <= set(completions["honoured"])
    assert "parallel_tool_calls" in completions["accepted_without_effect"] and "user" in chat["accepted_without_effect"]
    for name in fields["refused"]:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2, name: 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2, "stream": True,
                                                         "stream_options": {"continuous_usage_stats": True}})
    assert r.status_code == 400 and "continuous_usage_stats" in r.text, r.text
    for name in completions["accepted_without_effect"]:
        value = {"metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True}.get(name, "x")
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2, name: value})
        assert r.status_code == 200, (name, r.text)


def test_auto_with_a_strict_function_holds_its_calls_to_the_schema(client):
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    # Served with the grammar (free text, schema-bound calls; tests/test_tool_parsers.py checks the
    # grammar itself): whatever the model writes, any call it makes follows the schema.
    r = client.chat.completions.create(model="demo", messages=ASK, tools=[strict], tool_choice="auto",
                                       max_tokens=60, temperature=0.7, seed=3)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for call in r.choices[0].message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
