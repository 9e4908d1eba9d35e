"""The server's log, read as a log shipper reads it (`--log-format json`): the start-up summary,
one access-log line per generation request with its fields, `x-request-id` both ways, and neither
the API key nor (without --log-prompts) the prompt's text anywhere."""
from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Server

KEY = "sk-access-log-secret-4711"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def server():
    s = Server("--linear-backend", "aten", "--log-format", "json", "--api-key", KEY, "--log-prompts")
    yield s
    s.stop()


def access_line(server: Server, request_id: str) -> dict:
    """The access-log record of one request (it is written when the response ends)."""

    def match(line: str) -> bool:
        return '"tokenmill.access"' in line and request_id in line

    line = server.wait_for_line(match)
    assert line is not None, f"no access-log line for {request_id}:\n{server.output()[-3000:]}"
    return json.loads(line)


def test_startup_summary_and_every_line_is_json(server):
    records = [json.loads(line) for line in server.lines if line.strip()]  # each line one JSON object
    messages = [r["message"] for r in records]
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn follows the format too
    assert any(m.startswith("model demo:") and "float32 on cpu" in m for m in messages), messages
    assert any(m.startswith("kernels demo: linear aten") for m in messages), messages
    kv = next(r for r in records if r["message"].startswith("KV pool demo:"))
    assert kv["kv_blocks"] > 0 and kv["kv_tokens"] == kv["kv_blocks"] * 16 and kv["kv_bytes"] > 0
    limits = next(r for r in records if r["message"].startswith("limits demo: max_num_seqs="))
    assert limits["max_num_queued_reqs"] == 3 * limits["max_num_seqs"]  # the default: the batch and 2x queue
    assert (limits["max_queue_wait"], limits["shutdown_timeout"], limits["scheduling_policy"]) == (5.0, 30.0, "fcfs")
    urls = next(r for r in records if r["message"].startswith("serving demo:"))
    assert urls["url"] == f"{server.url}/v1"
    for part in (f"{server.url}/v1", f"{server.url}/dashboard", f"{server.url}/metrics", f":{server.grpc_port}"):
        assert part in urls["message"]
    assert all(r["level"] in ("INFO", "WARNING") for r in records)


def test_completion_fields_and_the_clients_request_id(server):
    r = httpx.post(f"{server.url}/v1/completions", headers={**AUTH, "x-request-id": "client-id-42"}, timeout=60,
                   json={"model": "demo", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-42"
    usage = r.json()["usage"]
    rec = access_line(server, "client-id-42")
    assert rec["request_id"] == "client-id-42" and rec["key_id"] == "default"
    assert (rec["method"], rec["route"], rec["status"], rec["model"]) == ("POST", "/v1/completions", 200, "demo")
    assert rec["prompt_tokens"] == usage["prompt_tokens"] and rec["output_tokens"] == usage["completion_tokens"] == 12
    assert 0 < rec["ttft_ms"] <= rec["total_ms"]
    assert rec["finish_reason"] == "length" and rec["refusal"] is None and rec["complete"] is True
    assert rec["prompt"] == PROMPT  # --log-prompts


def test_streamed_chat_gets_a_generated_request_id(server):
    body = {"model": "demo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=AUTH, json=body, timeout=60) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    rec = access_line(server, rid)
    assert (rec["route"], rec["status"], rec["key_id"]) == ("/v1/chat/completions", 200, "default")
    assert rec["output_tokens"] == usage["completion_tokens"] == 6 and rec["prompt_tokens"] == usage["prompt_tokens"]
    assert rec["finish_reason"] == "length" and rec["complete"] is True and rec["ttft_ms"] <= rec["total_ms"]
    assert PROMPT in rec["prompt"]  # the chat template's text around the message


def test_refused_request_is_logged_with_its_reason(server):
    r = httpx.post(f"{server.url}/v1/completions",
                   headers={"Authorization": "Bearer sk-wrong", "x-request-id": "bad key"},
                   json={"model": "demo", "prompt": PROMPT, "max_tokens": 4}, timeout=30)
    assert r.status_code == 401
    rid = r.headers["x-request-id"]
    assert rid != "bad key" and re.fullmatch(r"[0-9a-f]{32}", rid)  # a space: not a usable id, replaced
    rec = access_line(server, rid)
    assert (rec["status"], rec["refusal"], rec["code"], rec["key_id"]) == (401, "auth", "invalid_api_key", "unknown")
    assert rec["output_tokens"] == 0 and rec["ttft_ms"] is None and rec["finish_reason"] is None
    assert "prompt" not in rec  # never read, never logged


def test_kserve_generate_and_other_routes(server):
    long_id = "x" * 129  # over the limit: replaced
    r = httpx.post(f"{server.url}/v2/models/demo/generate", headers={**AUTH, "x-request-id": long_id},
                   json={"text_input": PROMPT, "parameters": {"max_tokens": 3}}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] != long_id
    rec = access_line(server, r.headers["x-request-id"])
    assert (rec["route"], rec["status"], rec["model"], rec["output_tokens"]) == ("/v2/models/demo/generate", 200,
                                                                                 "demo", 3)
    health = httpx.get(f"{server.url}/health", headers={"x-request-id": "probe-1"})
    assert health.headers["x-request-id"] == "probe-1"  # every response carries it...
    missing = httpx.get(f"{server.url}/no/such/route", headers={"x-request-id": "probe-2"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "probe-2"  # ...errors too
    assert server.wait_for_line(lambda line: "probe-" in line, timeout=0.5) is None  # not in the access log


def test_the_key_is_never_logged(server):
    assert KEY not in server.output()


def test_grpc_requests_get_their_lines_too(server):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    arrays = (np.array([[5, 6, 7]], dtype=np.uint32), np.array([[3]], dtype=np.uint32),
              np.array([[4]], dtype=np.uint32))
    inputs = [grpcclient.InferInput(n, a.shape, "UINT32") for n, a in
              zip(("input_ids", "input_lengths", "request_output_len"), arrays)]
    for i, a in zip(inputs, arrays):
        i.set_data_from_numpy(a)
    auth = {"authorization": AUTH["Authorization"]}
    client.infer("demo", inputs, request_id="grpc-unary-1", headers=auth)
    rec = access_line(server, "grpc-unary-1")
    assert (rec["method"], rec["route"], rec["status"], rec["model"], rec["key_id"], rec["output_tokens"],
            rec["complete"]) == ("gRPC", "/inference.GRPCInferenceService/ModelInfer", 200, "demo", "default", 4, True)
    assert rec["prompt_tokens"] == 3 and rec["ttft_ms"] is not None

    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):  # no key
        client.infer("demo", inputs, request_id="grpc-denied-1")
    rec = access_line(server, "grpc-denied-1")
    assert rec["status"] == 401 and rec["refusal"] is not None and rec["output_tokens"] == 0

    results: list = []
    client.start_stream(callback=lambda result, error: results.append((result, error)), headers=auth)
    client.async_stream_infer("demo", inputs, request_id="grpc-stream-1")
    rec = access_line(server, "grpc-stream-1")
    client.stop_stream()
    assert (rec["route"], rec["status"], rec["output_tokens"]) == ("/inference.GRPCInferenceService/ModelStreamInfer",
                                                                   200, 4)
    # Unary calls also get the id back as metadata, made up when the request carries none.
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc  # the client's own stubs

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="demo")
    for name, a in zip(("input_ids", "input_lengths", "request_output_len"), arrays):
        t = request.inputs.add(name=name, datatype="UINT32", shape=list(a.shape))
        t.contents.uint_contents.extend(a.reshape(-1).tolist())
    _, call = stub.ModelInfer.with_call(request, metadata=tuple(auth.items()))
    rid = dict(call.initial_metadata())["x-request-id"]
    assert len(rid) == 32 and access_line(server, rid)["status"] == 200
    channel.close()
