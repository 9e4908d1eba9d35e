"""The end of a graceful shutdown: past --shutdown-timeout the requests still running are aborted
(a stream gets finish_reason "abort" and [DONE], its KV blocks go back) and the process exits 0;
a second signal exits at once."""
from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.e2e.conftest import Server

BODY = {"model": "demo", "prompt": "A stream too long to finish", "max_tokens": 1000, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture
def server(request):
    s = Server("--linear-backend", "aten", "--shutdown-timeout", request.param)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


def _stream_in_thread(server: Server) -> tuple[threading.Thread, threading.Event, dict]:
    started, result = threading.Event(), {"events": []}

    def run() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=BODY, timeout=120,
                              headers={"x-request-id": "long-one"}) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        result["events"].append(line[6:])
                        started.set()
        except httpx.HTTPError as e:  # the connection cut by a forced exit
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, started, result


@pytest.mark.parametrize("server", ["0.5"], indirect=True)
def test_past_the_timeout_the_rest_is_aborted_and_the_exit_is_0(server):
    t, started, result = _stream_in_thread(server)
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    rc = server.proc.wait(timeout=60)
    server._reader.join(timeout=10)
    events = result["events"]
    assert result["status"] == 200 and events[-1] == "[DONE]", result
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "abort"
    assert json.loads(events[-2])["usage"]["completion_tokens"] < 1000
    assert rc == 0, server.output()[-3000:]
    log = server.output()
    assert "aborting the 1 requests still running" in log
    assert "KV blocks in use at exit: 0 of" in log, log[-3000:]
    line = next(x for x in server.lines if "tokenmill.access" in x and "request_id=long-one" in x)
    assert "status=200" in line and "finish_reason=abort" in line and "complete=true" in line


@pytest.mark.parametrize("server", ["60"], indirect=True)
def test_a_second_signal_exits_at_once(server):
    t, started, result = _stream_in_thread(server)
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_for_line(lambda x: "SIGTERM: shutting down" in x, timeout=10)
    server.proc.send_signal(signal.SIGINT)
    rc = server.proc.wait(timeout=10)  # not the 60 s of --shutdown-timeout
    t.join(30)
    assert rc == 128 + signal.SIGINT
    assert "SIGINT again: exiting now" in server.output()
    assert "[DONE]" not in result["events"]  # cut off
