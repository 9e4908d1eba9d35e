"""The bouncer under overload, disconnects freeing KV blocks, API keys, rate limits, signatures."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server


@pytest.fixture(scope="module")
def small_server():
    s = Server("--max-num-queued-reqs", "8", "--max-num-seqs", "4")
    yield s
    s.stop()


def test_overload_gets_fast_503s_and_everything_drains(small_server):
    url = f"{small_server.url}/v1/completions"
    body = {"model": "demo", "prompt": "The Python interpreter", "max_tokens": 24, "temperature": 0}

    async def one(client: httpx.AsyncClient):
        t0 = time.monotonic()
        r = await client.post(url, json=body)
        return r, time.monotonic() - t0

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(one(client) for _ in range(100)))

    results = asyncio.run(main())
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [(r, dt) for r, dt in results if r.status_code == 503]
    assert len(ok) + len(refused) == 100
    assert ok and refused
    texts = {r.json()["choices"][0]["text"] for r in ok}
    assert len(texts) == 1  # same greedy answer for everyone admitted
    for r, dt in refused:
        assert dt < 1.0
        assert r.headers["retry-after"] == "1"
        assert "at capacity" in r.json()["error"]["message"]
    m = small_server.metrics()
    assert m["tokenmill:admission_rejections_total{reason=capacity}"] == len(refused)
    assert m["tokenmill:kv_cache_usage_perc"] == 0
    assert m["tokenmill:num_requests_running"] == 0 and m["tokenmill:num_requests_waiting"] == 0


def test_disconnect_mid_stream_frees_blocks(small_server):
    body = {"model": "demo", "prompt": "The Python interpreter", "max_tokens": 800, "temperature": 0.8,
            "stream": True, "ignore_eos": True}
    before = small_server.metrics().get("tokenmill:request_success_total{finished_reason=abort}", 0)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{small_server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert small_server.metrics()["tokenmill:kv_cache_usage_perc"] > 0
        # leaving the block closes the connection mid-stream
    deadline = time.time() + 10
    while time.time() < deadline:
        m = small_server.metrics()
        if m["tokenmill:kv_cache_usage_perc"] == 0 and m["tokenmill:num_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m["tokenmill:kv_cache_usage_perc"] == 0 and m["tokenmill:num_requests_running"] == 0
    assert m["tokenmill:request_success_total{finished_reason=abort}"] == before + 1


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    keys = d / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"id": "team-a", "key": "sk-team-a-secret", "requests_per_minute": 3},
        {"id": "team-b", "key": "sk-team-b-secret", "tokens_per_minute": 60,
         "signature": {"user_agent_patterns": ["^OpenAI/Python"], "action": "block"}},
        {"id": "team-c", "key": "sk-team-c-secret"},
    ]}))
    s = Server("--api-keys-file", str(keys))
    yield s
    s.stop()


def test_keys_rate_limits_and_signatures(keyed_server):
    base = f"{keyed_server.url}/v1"
    anon = openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        anon.completions.create(model="demo", prompt="x", max_tokens=2)
    assert "wrong-key" not in str(e.value)
    assert httpx.post(f"{base}/completions", json={"model": "demo", "prompt": "x"}).status_code == 401
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200  # health stays open
    assert httpx.get(f"{keyed_server.url}/metrics").status_code == 200
    a = openai.OpenAI(base_url=base, api_key="sk-team-a-secret", max_retries=0)
    for _ in range(3):
        a.completions.create(model="demo", prompt="x", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        a.completions.create(model="demo", prompt="x", max_tokens=2)
    assert "requests per minute" in str(e.value) and e.value.response.headers["retry-after"]
    b = openai.OpenAI(base_url=base, api_key="sk-team-b-secret", max_retries=0)
    b.completions.create(model="demo", prompt="x", max_tokens=2)  # the official client's User-Agent passes
    r = httpx.post(f"{base}/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer sk-team-b-secret", "User-Agent": "curl/8.0"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "client_signature_mismatch"
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        b.completions.create(model="demo", prompt="x", max_tokens=200)
    m = keyed_server.metrics()
    assert m["tokenmill:admission_rejections_total{reason=auth}"] == 2
    assert m["tokenmill:admission_rejections_total{reason=rate_limit}"] == 2
    assert m["tokenmill:admission_rejections_total{reason=signature}"] == 1


def _ft_inputs(module, n_out: int = 4):
    import numpy as np

    arrays = (("input_ids", np.array([[263, 79, 323]], np.uint32)), ("input_lengths", np.array([[3]], np.uint32)),
              ("request_output_len", np.array([[n_out]], np.uint32)))
    out = []
    for name, a in arrays:
        t = module.InferInput(name, a.shape, "UINT32")
        t.set_data_from_numpy(a)
        out.append(t)
    return out


def test_keys_apply_to_the_kserve_routes_over_http_and_grpc(keyed_server):
    """The same bouncer guards Triton's protocol: 401 / UNAUTHENTICATED without a key."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["hi"]}]}
    assert httpx.post(f"{keyed_server.url}/v2/models/demo/infer", json=body).status_code == 401
    ok = httpx.post(f"{keyed_server.url}/v2/models/demo/infer", json=body,
                    headers={"Authorization": "Bearer sk-team-c-secret"})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["name"] == "text_output"
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{keyed_server.grpc_port}")
    with pytest.raises(InferenceServerException) as exc:
        client.infer("demo", _ft_inputs(grpcclient))
    assert "UNAUTHENTICATED" in str(exc.value.status())
    result = client.infer("demo", _ft_inputs(grpcclient), headers={"authorization": "Bearer sk-team-c-secret"})
    assert result.as_numpy("sequence_length")[0, 0] == 7
    http = httpclient.InferenceServerClient(f"127.0.0.1:{keyed_server.port}")
    with pytest.raises(InferenceServerException) as exc:
        http.infer("demo", _ft_inputs(httpclient))
    assert "401" in str(exc.value.status())


def test_capacity_applies_to_grpc(small_server):
    """At capacity a gRPC request gets UNAVAILABLE at once, as HTTP gets 503."""
    import concurrent.futures

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def one(_: int) -> str:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{small_server.grpc_port}")
        try:
            client.infer("demo", _ft_inputs(grpcclient, n_out=48))
            return "ok"
        except InferenceServerException as e:
            return str(e.status())

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(24)))
    assert "ok" in outcomes and any("UNAVAILABLE" in o for o in outcomes), outcomes
    assert all(o == "ok" or "UNAVAILABLE" in o for o in outcomes), outcomes


def test_a_request_over_a_limit_on_its_own_is_a_400_not_endless_503s(small_server):
    url = f"{small_server.url}/v1/completions"
    r = httpx.post(url, json={"model": "demo", "prompt": ["a"] * 9, "max_tokens": 1})
    assert r.status_code == 400 and "--max-num-queued-reqs" in r.json()["error"]["message"], r.text
