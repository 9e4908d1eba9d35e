"""The OpenAI API, driven by the official openai client; raw HTTP for malformed input."""
from __future__ import annotations

import httpx
import openai
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.cli import DEMO_MODEL


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    return LLM(DEMO_MODEL)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.headers["content-type"] == "application/json"
    assert health.json() == {"status": "ok"}


def test_openapi_documents_every_status_with_the_error_body(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["error"]["$ref"] == "#/components/schemas/ErrorDetail"
    assert set(schema["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "403", "404", "429", "503"}, path
        for status in ("400", "401", "403", "404", "429", "503"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse"
    assert set(schema["paths"]["/v1/models"]["get"]["responses"]) == {"200", "401"}
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    # What the schema says is what the server sends: a real 400 and a real 404.
    bad = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": -1})
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    for r, status, err_type in ((bad, 400, "invalid_request_error"), (missing, 404, "not_found_error")):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["type"] == err_type


def test_completion_matches_offline_engine(client, reference):
    r = client.completions.create(model="demo", prompt="The Python interpreter", max_tokens=16, temperature=0)
    expected = reference.generate("The Python interpreter", SamplingParams(temperature=0, max_tokens=16),
                                  use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == 3 and r.usage.total_tokens == 19


def test_chat_uses_template_and_streams(client, reference):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]
    full = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0)
    expected = reference.chat(messages, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert full.choices[0].message.content == expected.outputs[0].text
    assert full.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert usage.completion_tokens == 20 and finish == "length"


def test_completion_stream_n_stop_seed(client):
    chunks = list(client.completions.create(model="demo", prompt="A list is", max_tokens=12, temperature=0,
                                            stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = client.completions.create(model="demo", prompt="A list is", max_tokens=12, temperature=0)
    assert text == plain.choices[0].text
    stop = plain.choices[0].text[4:7]
    cut = client.completions.create(model="demo", prompt="A list is", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == plain.choices[0].text[:plain.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kw = dict(model="demo", prompt="A list is", max_tokens=10, temperature=1.0, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    extras = client.completions.create(model="demo", prompt="A list is", max_tokens=5, temperature=0.5,
                                       extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.2,
                                                   "ignore_eos": True})
    assert extras.usage.completion_tokens == 5


def test_logprobs(client):
    r = client.completions.create(model="demo", prompt="A list is", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) == 3
    assert all(x <= 0 for x in lp.token_logprobs)
    c = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == 3 and len(c.choices[0].logprobs.content[0].top_logprobs) == 2


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(model="nope", prompt="x"), openai.NotFoundError, "does not exist"),
    (dict(model="demo", prompt="x", max_tokens=-5), openai.BadRequestError, "max_tokens"),
    (dict(model="demo", prompt="x", max_tokens=10**9), openai.BadRequestError, "maximum context length"),
    (dict(model="demo", prompt="x", temperature=-1), openai.BadRequestError, "temperature"),
    (dict(model="demo", prompt="hello " * 2000), openai.BadRequestError, "maximum context length"),
])
def test_errors_surface_as_client_exceptions(client, kwargs, exc, fragment):
    with pytest.raises(exc) as e:
        client.completions.create(**kwargs)
    assert fragment in str(e.value)


def test_chat_errors(client):
    with pytest.raises(openai.BadRequestError, match="at least one message"):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("body", [
    b"{not json", b'{"model": "demo", "prompt": "\xff\xfe"}', b'{"model": "demo"}', b"[]",
    b'{"model": "demo", "prompt": "x", "max_tokens": "many"}', b'{"model": "demo", "prompt": "x", "n": 0}',
    b'{"model": "demo", "prompt": [1, "a"]}', b'{"model": "demo", "prompt": [999999]}',
    b'{"model": "demo", "prompt": "x", "min_tokens": 2, "stop_token_ids": [999999]}',
    b'{"model": "demo", "prompt": "x", "stream": true, "min_tokens": 2, "stop_token_ids": [999999]}',
])
def test_malformed_input_is_a_4xx_with_openai_body(server, body):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_metrics_parse_and_describe_load(server, client):
    before = server.metrics().get("tokenmill:admission_rejections_total{reason=bad_request}", 0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="x", temperature=-3)
    client.completions.create(model="demo", prompt="x", max_tokens=3)
    m = server.metrics()
    for name in ("tokenmill:num_requests_running", "tokenmill:num_requests_waiting", "tokenmill:kv_cache_usage_perc",
                 "tokenmill:model_bandwidth_utilization", "tokenmill:model_flops_utilization",
                 "tokenmill:prefix_cache_queries_total", "tokenmill:prefix_cache_hits_total",
                 "tokenmill:num_preemptions_total", "tokenmill:prompt_tokens_total",
                 "tokenmill:generation_tokens_total", "tokenmill:time_to_first_token_seconds_count",
                 "tokenmill:inter_token_latency_seconds_count", "tokenmill:e2e_request_latency_seconds_count",
                 "tokenmill:batch_size_sequences_count", "tokenmill:batch_size_tokens_count"):
        assert name in m, name
    assert m["tokenmill:generation_tokens_total"] >= 3
    assert m["tokenmill:request_success_total{finished_reason=length}"] >= 1
    assert m["tokenmill:admission_rejections_total{reason=bad_request}"] == before + 1
    assert m["tokenmill:kv_cache_usage_perc"] == 0 and m["tokenmill:num_requests_running"] == 0


@pytest.mark.parametrize("extra,status,expected", [
    (dict(suffix="x"), 400, "'suffix' is not supported"),
    (dict(prediction={"type": "content", "content": "x"}), 400, "'prediction' is not supported"),
    (dict(best_of=3), 400, "best_of=3"),
    (dict(guided_whitespace_pattern=" "), 400, "'guided_whitespace_pattern' is not supported"),
    (dict(guided_decoding_backend="outlines"), 400, "'outlines' is not available"),
    (dict(structured_outputs={"regex": "a+", "whitespace_pattern": " "}), 400, "'whitespace_pattern'"),
    (dict(guided_regex="a+", response_format={"type": "json_object"}), 400, "one output constraint"),
    (dict(frobnicate=1), 400, "unknown field 'frobnicate'"),
    (dict(user="u1", metadata={"k": "v"}, store=False, response_format={"type": "text"}), 200, None),
])
def test_fields_that_would_change_the_output_are_refused_not_ignored(server, extra, status, expected):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == status, r.text
    if expected:
        assert expected in r.json()["error"]["message"] and r.json()["error"]["param"] in extra
    chat = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra})
    assert chat.status_code == status, chat.text
