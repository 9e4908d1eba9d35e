"""Graceful shutdown: SIGTERM with two streams in flight. They finish, a new request and /health
get 503 while the server drains, the process exits 0 and no KV block is left in use. The log is
the default one (text, INFO), without the prompts' text."""
from __future__ import annotations

import json
import signal
import threading

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Server

PROMPT = "Graceful shutdown lets the running streams finish"


def test_sigterm_drains_streams_then_exits_0():
    server = Server("--linear-backend", "aten", "--shutdown-timeout", "60")
    try:
        body = {"model": "demo", "prompt": PROMPT, "max_tokens": 600, "ignore_eos": True, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        results: list[dict] = [{}, {}]
        first_chunk = [threading.Event(), threading.Event()]

        def stream(i: int) -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                              headers={"x-request-id": f"drain-{i}"}) as r:
                results[i]["status"] = r.status_code
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk[i].set()
                results[i]["events"] = events

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in first_chunk)
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_for_line(lambda line: "SIGTERM: shutting down" in line, timeout=10), server.output()

        # Draining: the streams still run, new work is turned away, /health says so.
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 2},
                             timeout=10)
        health = httpx.get(f"{server.url}/health", timeout=10)
        kserve = httpx.post(f"{server.url}/v2/models/demo/generate", timeout=10,
                            json={"text_input": "hi", "parameters": {"max_tokens": 2}})
        kserve_ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        grpc_ready = grpc.is_server_ready()
        text_in = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text_in.set_data_from_numpy(np.array([[b"hi"]], dtype=np.object_))
        with pytest.raises(InferenceServerException) as grpc_refused:
            grpc.infer("demo", [text_in])
        still_running = [t.is_alive() for t in threads]
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]
        assert refused.headers["x-request-id"]
        assert health.status_code == 503 and health.json() == {"status": "shutting_down"}
        assert kserve.status_code == 503 and "shutting down" in kserve.json()["error"] and kserve_ready == 503
        assert not grpc_ready and grpc_refused.value.status() == "StatusCode.UNAVAILABLE"
        assert any(still_running), "the streams ended before the checks: make them longer"

        for t in threads:
            t.join(90)
        rc = server.proc.wait(timeout=60)
        for res in results:
            assert res["status"] == 200 and res["events"][-1] == "[DONE]"
            assert json.loads(res["events"][-2])["usage"]["completion_tokens"] == 600  # all of it, not cut off
            assert json.loads(res["events"][-3])["choices"][0]["finish_reason"] == "length"
        assert rc == 0, server.output()[-3000:]
        server._reader.join(timeout=10)
        log = server.output()
        assert "KV blocks in use at exit: 0 of" in log, log[-3000:]
        streams = [line for line in server.lines if "tokenmill.access" in line and "request_id=drain-" in line]
        assert len(streams) == 2 and all("status=200" in s and "output_tokens=600" in s and "finish_reason=length" in s
                                         for s in streams), streams
        refusal = [line for line in server.lines if "tokenmill.access" in line and "refusal=shutting_down" in line]
        # OpenAI and KServe over HTTP, and KServe over gRPC
        assert len(refusal) == 3 and all("status=503" in r for r in refusal), refusal
        assert sum("method=gRPC route=/inference.GRPCInferenceService/ModelInfer" in r for r in refusal) == 1
        assert PROMPT not in log  # no --log-prompts: no prompt text
        # The default log: INFO, with the summary and the URLs.
        assert "INFO tokenmill.server: KV pool demo:" in log and f"API {server.url}/v1" in log
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
