"""Triton's (KServe v2) protocol, driven by the official tritonclient over HTTP and gRPC: the
FasterTransformer client flow (tokenize, send input_ids / input_lengths / request_output_len,
receive output_ids, detokenize), binary and JSON tensors, batches of rows, gRPC streaming, the
generate extension, metadata and readiness, and bad input over both transports."""
from __future__ import annotations

import json
import queue

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer


DEMO = "tokenmill/demo_model"
PROMPTS = ["The Python interpreter", "A list is a"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO)


def openai_text(server, prompt: str, n: int) -> str:
    r = httpx.post(f"{server.url}/v1/completions",
                   json={"model": "demo", "prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=60)
    return r.json()["choices"][0]["text"]


def ft_arrays(tok, prompts: list[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = [tok.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    padded = np.array([i + [0] * (width - len(i)) for i in ids], dtype=np.uint32)
    return padded, np.array([[len(i)] for i in ids], dtype=np.uint32), np.full((len(ids), 1), n, dtype=np.uint32)


def decode_rows(tok, output_ids: np.ndarray, lengths: np.ndarray, seq_len: np.ndarray) -> list[str]:
    return [tok.decode(output_ids[b, 0, int(lengths[b, 0]):int(seq_len[b, 0])], skip_special_tokens=True)
            for b in range(output_ids.shape[0])]


@pytest.mark.parametrize("binary", [True, False])
def test_http_client_flow_matches_openai(server, tok, binary):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    assert client.get_model_metadata("demo")["inputs"][0] == {"name": "input_ids", "datatype": "UINT32",
                                                              "shape": [-1, -1], "optional": False}
    arrays = ft_arrays(tok, PROMPTS, 12)
    inputs = [httpclient.InferInput(n, a.shape, "UINT32") for n, a in
              zip(("input_ids", "input_lengths", "request_output_len"), arrays)]
    for i, a in zip(inputs, arrays):
        i.set_data_from_numpy(a, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("output_ids", "sequence_length")]
    result = client.infer("demo", inputs, outputs=outputs)
    out, seq_len = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    assert out.dtype == np.uint32 and out.shape[:2] == (2, 1)
    for b, prompt in enumerate(PROMPTS):  # each row is the prompt, then what was generated
        assert out[b, 0, :arrays[1][b, 0]].tolist() == tok.encode(prompt)
    assert decode_rows(tok, out, arrays[1], seq_len) == [openai_text(server, p, 12) for p in PROMPTS]


def test_grpc_client_flow_batch_and_stream(server, tok):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    assert client.get_server_metadata().name == "tokenmill"
    assert [t.name for t in client.get_model_metadata("demo").outputs][:2] == ["output_ids", "sequence_length"]
    arrays = ft_arrays(tok, PROMPTS, 12)
    inputs = [grpcclient.InferInput(n, a.shape, "UINT32") for n, a in
              zip(("input_ids", "input_lengths", "request_output_len"), arrays)]
    for i, a in zip(inputs, arrays):
        i.set_data_from_numpy(a)
    result = client.infer("demo", inputs)
    expected = [openai_text(server, p, 12) for p in PROMPTS]
    assert decode_rows(tok, result.as_numpy("output_ids"), arrays[1], result.as_numpy("sequence_length")) == expected

    # Decoupled streaming: one response per step with its new tokens, the last flagged final.
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    one = [grpcclient.InferInput(n, a[:1].shape, "UINT32") for n, a in
           zip(("input_ids", "input_lengths", "request_output_len"), arrays)]
    for i, a in zip(one, arrays):
        i.set_data_from_numpy(a[:1])
    client.async_stream_infer("demo", one, enable_empty_final_response=True)
    pieces, count = [], 0
    while True:
        res, err = responses.get(timeout=60)
        assert err is None, err
        count += 1
        ids = res.as_numpy("output_ids")
        if ids is not None:
            pieces += ids.reshape(-1).tolist()
        if res.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    assert count >= 2 and tok.decode(pieces, skip_special_tokens=True) == expected[0]


def test_generate_extension(server):
    body = {"text_input": PROMPTS[0], "parameters": {"max_tokens": 12, "temperature": 0}}
    r = httpx.post(f"{server.url}/v2/models/demo/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["text_output"] == PROMPTS[0] + openai_text(server, PROMPTS[0], 12)
    with httpx.stream("POST", f"{server.url}/v2/models/demo/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == openai_text(server, PROMPTS[0], 12)
    bad = httpx.post(f"{server.url}/v2/models/demo/generate",
                     json={"text_input": "x", "parameters": {"max_tokens": 4, "beam_width": 2}})
    assert bad.status_code == 400 and "parameters.beam_width" in bad.json()["error"]


def _infer_json(server, inputs, model="demo", **extra):
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=60, **extra)


BAD_HTTP = [
    ("wrong datatype", [{"name": "input_ids", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.0]},
                        {"name": "input_lengths", "datatype": "UINT32", "shape": [1, 1], "data": [2]},
                        {"name": "request_output_len", "datatype": "UINT32", "shape": [1, 1], "data": [4]}],
     "input_ids"),
    ("shape does not match data", [{"name": "input_ids", "datatype": "UINT32", "shape": [1, 3], "data": [1, 2]}],
     "3 expected"),
    ("inconsistent input_lengths", [{"name": "input_ids", "datatype": "UINT32", "shape": [1, 2], "data": [5, 6]},
                                    {"name": "input_lengths", "datatype": "UINT32", "shape": [1, 1], "data": [7]},
                                    {"name": "request_output_len", "datatype": "UINT32", "shape": [1, 1],
                                     "data": [4]}], "input_lengths[0] is 7"),
    ("missing required input", [{"name": "input_ids", "datatype": "UINT32", "shape": [1, 2], "data": [5, 6]}],
     "missing required input 'input_lengths'"),
    ("unknown datatype", [{"name": "input_ids", "datatype": "UINT33", "shape": [1], "data": [5]}], "UINT33"),
]


@pytest.mark.parametrize("case,inputs,expected", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_bad_input_over_http(server, case, inputs, expected):
    r = _infer_json(server, inputs)
    assert r.status_code == 400 and expected in r.json()["error"], r.text


def test_unknown_model_version_and_lying_binary_header(server):
    assert _infer_json(server, [], model="nope").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/demo/versions/7").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/demo/versions/1/ready").status_code == 200
    head = json.dumps({"inputs": [{"name": "input_ids", "datatype": "UINT32", "shape": [1, 2],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    body = head + np.array([5, 6], dtype=np.uint32).tobytes()
    for length, expected in ((len(head) + 100, "Inference-Header-Content-Length"), (len(head) - 3, "not valid JSON"),
                             (len(head) + 4, "not valid JSON")):
        r = httpx.post(f"{server.url}/v2/models/demo/infer", content=body,
                       headers={"Inference-Header-Content-Length": str(length)})
        assert r.status_code == 400 and expected in r.json()["error"], (length, r.text)
    short = head.replace(b'"binary_data_size": 8', b'"binary_data_size": 64')
    r = httpx.post(f"{server.url}/v2/models/demo/infer", content=short + body[len(head):],
                   headers={"Inference-Header-Content-Length": str(len(short))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]


def test_bad_input_over_grpc_and_the_server_keeps_going(server, tok):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")

    def tensors(**arrays):
        out = []
        for name, (dt, a) in arrays.items():
            t = grpcclient.InferInput(name, a.shape, dt)
            t.set_data_from_numpy(a)
            out.append(t)
        return out

    ids = np.array([[5, 6]], dtype=np.uint32)
    cases = [
        ("demo", tensors(input_ids=("FP32", ids.astype(np.float32)), input_lengths=("UINT32", np.array([[2]], np.uint32)),
                         request_output_len=("UINT32", np.array([[4]], np.uint32))), "INVALID_ARGUMENT"),
        ("demo", tensors(input_ids=("UINT32", ids), input_lengths=("UINT32", np.array([[9]], np.uint32)),
                         request_output_len=("UINT32", np.array([[4]], np.uint32))), "INVALID_ARGUMENT"),
        ("demo", tensors(input_ids=("UINT32", ids)), "INVALID_ARGUMENT"),
        ("nope", tensors(input_ids=("UINT32", ids)), "NOT_FOUND"),
    ]
    for model, inputs, code in cases:
        with pytest.raises(InferenceServerException) as exc:
            client.infer(model, inputs)
        assert code in str(exc.value.status()), (model, exc.value)
    with pytest.raises(InferenceServerException) as exc:
        client.is_model_ready("demo", model_version="3")
    assert "NOT_FOUND" in str(exc.value.status())
    # Everyone else's requests keep going, and nothing leaked.
    arrays = ft_arrays(tok, PROMPTS[:1], 4)
    good = tensors(input_ids=("UINT32", arrays[0]), input_lengths=("UINT32", arrays[1]),
                   request_output_len=("UINT32", arrays[2]))
    assert client.infer("demo", good).as_numpy("sequence_length")[0, 0] == arrays[1][0, 0] + 4
    assert server.metrics()["tokenmill:kv_cache_usage_perc"] == 0.0


def test_optional_inputs_text_infer_and_log_probs(server, tok):
    """FasterTransformer's optional inputs (sampling with a seed, stop words, log probs) and the
    text interface through infer."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    ids, lengths, out_len = ft_arrays(tok, PROMPTS[:1], 16)

    def run(**extra: np.ndarray):
        arrays = {"input_ids": ids, "input_lengths": lengths, "request_output_len": out_len, **extra}
        inputs = []
        for name, a in arrays.items():
            dt = {np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.float32): "FP32",
                  np.dtype(np.int32): "INT32"}[a.dtype]
            t = httpclient.InferInput(name, a.shape, dt)
            t.set_data_from_numpy(a)
            inputs.append(t)
        wanted = [httpclient.InferRequestedOutput(n) for n in ("output_ids", "sequence_length", "output_log_probs")]
        return client.infer("demo", inputs, outputs=wanted)

    sampled = dict(runtime_top_k=np.array([[20]], np.uint32), temperature=np.array([[1.0]], np.float32),
                   random_seed=np.array([[7]], np.uint64))
    a, b = run(**sampled), run(**sampled)
    assert np.array_equal(a.as_numpy("output_ids"), b.as_numpy("output_ids"))  # same seed, same tokens
    lp = a.as_numpy("output_log_probs")
    assert lp.shape == (1, 1, 16) and (lp <= 0).all() and (lp < 0).any()
    # A stop word: FasterTransformer's [batch, 2, n] layout, the word's ids then its end offset.
    greedy = run().as_numpy("output_ids")[0, 0, lengths[0, 0]:]
    word = tok.decode(greedy[2:3].tolist())
    stop_ids = tok.encode(word)
    stop = np.array([[stop_ids, [len(stop_ids)] + [-1] * (len(stop_ids) - 1)]], dtype=np.int32)
    stopped = run(stop_words_list=stop)
    assert stopped.as_numpy("sequence_length")[0, 0] < lengths[0, 0] + 16
    # The text interface through infer: the prompt and its continuation.
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [PROMPTS[0]]},
                       {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [12]},
                       {"name": "temperature", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}]}
    r = httpx.post(f"{server.url}/v2/models/demo/infer", json=body, timeout=60).json()
    assert r["outputs"][0]["data"] == [PROMPTS[0] + openai_text(server, PROMPTS[0], 12)]


def _ft_json(**extra):
    base = [{"name": "input_ids", "datatype": "UINT32", "shape": [1, 2], "data": [5, 6]},
            {"name": "input_lengths", "datatype": "UINT32", "shape": [1, 1], "data": [2]},
            {"name": "request_output_len", "datatype": "UINT32", "shape": [1, 1], "data": [4]}]
    return base + [dict(name=k, **v) for k, v in extra.items()]


@pytest.mark.parametrize("body,expected", [
    ({"inputs": [{"name": "input_ids", "datatype": "UINT32", "shape": [1], "data": [5], "parameters": [1]}]},
     "'parameters' must be an object"),
    ({"inputs": [{"name": "input_ids", "datatype": ["UINT32"], "shape": [1], "data": [5]}]}, "unknown datatype"),
    ({"inputs": _ft_json(), "parameters": "x"}, "'parameters' must be an object"),
    ({"inputs": _ft_json(), "parameters": {"priority": 1}}, "unknown request parameter 'priority'"),
    ({"inputs": _ft_json(), "parameters": {"binary_data_output": "false"}}, "must be a boolean"),
    ({"inputs": _ft_json(), "parameters": {"exclude_input_in_output": True}}, "applies to text_input"),
    ({"inputs": _ft_json(temperature={"datatype": "FP32", "shape": [1, 1], "data": [1e39]})}, "not finite"),
    ({"inputs": _ft_json(stop_words_list={"datatype": "INT32", "shape": [1, 2, 1], "data": [-5, 1]})},
     "outside [0,"),
    ({"inputs": [{"name": "input_ids", "datatype": "UINT32", "shape": [0, 2], "data": []},
                 {"name": "input_lengths", "datatype": "UINT32", "shape": [0, 1], "data": []},
                 {"name": "request_output_len", "datatype": "UINT32", "shape": [0, 1], "data": []}]}, "no rows"),
    ({"inputs": [{"name": "text_input", "datatype": "INT32", "shape": [1, 1], "data": [5]}]}, "must be BYTES"),
    # More rows than any server takes (the limit follows max_num_seqs, at most 1024, chosen from
    # the roofline when not given): refused whole, naming the limit.
    ({"inputs": [{"name": "input_ids", "datatype": "UINT32", "shape": [2049, 1], "data": [5] * 2049},
                 {"name": "input_lengths", "datatype": "UINT32", "shape": [2049, 1], "data": [1] * 2049},
                 {"name": "request_output_len", "datatype": "UINT32", "shape": [2049, 1], "data": [2] * 2049}]},
     "the batch has 2049 rows; this server takes at most"),
], ids=["input parameters", "datatype list", "request parameters", "unknown parameter", "string bool",
        "exclude on FT", "fp32 overflow", "negative stop word", "zero rows", "text not bytes", "batch too large"])
def test_more_bad_input_is_refused_not_crashed(server, body, expected):
    r = httpx.post(f"{server.url}/v2/models/demo/infer", json=body, timeout=60)
    assert r.status_code == 400 and expected in r.json()["error"], r.text


def test_non_finite_values_and_overflowing_generate_parameters(server):
    nan = b'{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}, ' \
          b'{"name": "temperature", "datatype": "FP32", "shape": [1, 1], "data": [NaN]}]}'
    r = httpx.post(f"{server.url}/v2/models/demo/infer", content=nan)
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    for params in ({"max_tokens": 2**31}, {"seed": 2**64}, {"top_k": -1}, {"stream": True}):
        r = httpx.post(f"{server.url}/v2/models/demo/generate", json={"text_input": "x", "parameters": params})
        assert r.status_code == 400, (params, r.text)
    r = httpx.post(f"{server.url}/v2/models/demo/generate_stream",
                   json={"text_input": "x", "parameters": {"exclude_input_in_output": False}})
    assert r.status_code == 400 and "exclude_input_in_output" in r.json()["error"]


def test_a_client_that_goes_away_mid_infer_frees_its_requests(server):
    import time

    limit = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
    body = {"inputs": _ft_json()}
    body["inputs"][2]["data"] = [limit - 2]  # the longest it may be: still running when the client leaves
    aborted = server.metrics()["tokenmill:request_success_total{finished_reason=abort}"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v2/models/demo/infer", json=body, timeout=0.5)
    deadline = time.time() + 20
    while time.time() < deadline:
        m = server.metrics()
        if m["tokenmill:num_requests_running"] == 0 and m["tokenmill:kv_cache_usage_perc"] == 0.0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the abandoned request kept running: {m}")
    assert m["tokenmill:request_success_total{finished_reason=abort}"] == aborted + 1


def test_requests_on_one_grpc_stream_run_concurrently(server, tok):
    import time

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    arrays = ft_arrays(tok, PROMPTS[:1], 24)
    for rid in ("a", "b"):
        inputs = [grpcclient.InferInput(n, a.shape, "UINT32") for n, a in
                  zip(("input_ids", "input_lengths", "request_output_len"), arrays)]
        for i, a in zip(inputs, arrays):
            i.set_data_from_numpy(a)
        client.async_stream_infer("demo", inputs, request_id=rid, enable_empty_final_response=True)
    order, finals = [], 0
    deadline = time.time() + 60
    while finals < 2 and time.time() < deadline:
        res, err = responses.get(timeout=60)
        assert err is None, err
        order.append(res.get_response().id)
        finals += res.get_response().parameters["triton_final_response"].bool_param
    client.stop_stream()
    # Interleaved: b's first response came before a's last, so b did not wait for a to finish.
    assert finals == 2 and order.index("b") < len(order) - 1 - order[::-1].index("a"), order
