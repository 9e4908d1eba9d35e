"""The pieces of the server's logging and shutdown, without a model: the JSON format, the
request id, the access record, the middleware, the drain's abort."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tokenmill.logs import JsonFormatter, configure_logging, resolve
from tokenmill.server import access_log
from tokenmill.server.access_log import AccessRecord, request_id
from tokenmill.server.lifecycle import ABORTED, Lifecycle
from tokenmill.server.middleware import AccessLogMiddleware
from tokenmill.server.refusal import Refusal


def test_resolve_prefers_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("TOKENMILL_LOG_LEVEL", raising=False)
    monkeypatch.delenv("TOKENMILL_LOG_FORMAT", raising=False)
    assert resolve(None, None, "INFO") == ("INFO", "text")
    monkeypatch.setenv("TOKENMILL_LOG_LEVEL", "error")
    monkeypatch.setenv("TOKENMILL_LOG_FORMAT", "JSON")
    assert resolve(None, None, "INFO") == ("ERROR", "json")
    assert resolve("debug", "text", "INFO") == ("DEBUG", "text")
    with pytest.raises(ValueError, match="log level"):
        resolve("loud", None)
    with pytest.raises(ValueError, match="log format"):
        resolve(None, "xml")


def _record(msg: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("tokenmill.test", logging.INFO, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_formatter_one_object_per_line_with_the_extra_fields():
    line = JsonFormatter().format(_record("hello\nworld", request_id="r1", status=200, color_message="\x1b[1m"))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "hello\nworld" and obj["level"] == "INFO" and obj["logger"] == "tokenmill.test"
    assert obj["request_id"] == "r1" and obj["status"] == 200 and "color_message" not in obj
    assert obj["time"].endswith("Z")
    assert json.loads(JsonFormatter({"rank": 1}).format(_record("x", _json_message="short")))["message"] == "short"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(JsonFormatter().format(rec))["exc_info"]


def test_configure_logging_replaces_only_its_own_handler():
    root = logging.getLogger()
    before = [h for h in root.handlers if not getattr(h, "_tokenmill", False)]  # an earlier test's may be there
    level = root.level
    try:
        configure_logging("INFO", "json")
        configure_logging("DEBUG", "text")
        ours = [h for h in root.handlers if getattr(h, "_tokenmill", False)]
        assert len(ours) == 1 and all(h in root.handlers for h in before)
        assert root.level == logging.DEBUG and logging.getLogger("uvicorn.error").propagate
    finally:
        for h in list(root.handlers):
            if getattr(h, "_tokenmill", False):
                root.removeHandler(h)
        root.setLevel(level)


@pytest.mark.parametrize("given,kept", [("abc-123", True), ("a" * 128, True), ("a" * 129, False), ("", False),
                                        ("has space", False), ("tab\tin", False), ("ünïcode", False), (None, False)])
def test_request_id_is_the_clients_when_usable(given, kept):
    rid = request_id(given)
    assert (rid == given) is kept
    if not kept:
        assert len(rid) == 32 and int(rid, 16) >= 0


def test_access_record_fields():
    rec = AccessRecord("r", "POST", "/v1/completions", start=10.0)
    rec.status, rec.key_id, rec.prompt = 200, "team-a", "secret prompt"
    rec.token_seen(10.25)
    rec.token_seen(10.5)  # the first token counts
    rec.job_done(5, 7, ["stop"])
    rec.job_done(3, 2, ["length"])
    f = rec.fields(11.0)
    assert (f["prompt_tokens"], f["output_tokens"], f["ttft_ms"], f["total_ms"]) == (8, 9, 250.0, 1000.0)
    assert f["finish_reason"] == "length,stop" and f["refusal"] is None and "prompt" not in f
    rec.log_prompts = True
    assert rec.fields(11.0)["prompt"] == "secret prompt"
    refused = AccessRecord("q", "POST", "/v1/completions", start=0.0)
    refused.status = 500
    assert refused.fields(0.0)["refusal"] == "error" and refused.fields(0.0)["ttft_ms"] is None
    text = access_log.text({"a": None, "b": "x y", "c": 3, "d": "plain"})
    assert text == 'a=- b="x y" c=3 d=plain'


def _app(lifecycle: Lifecycle) -> Starlette:
    async def gen(request):
        rec = access_log.current()
        rec.key_id = "k"

        async def body():
            for i in range(3):
                yield f"data: {i}\n\n"
            rec.job_done(1, 3, ["length"])

        return StreamingResponse(body(), media_type="text/event-stream")

    async def boom(request):
        raise RuntimeError("kaput")

    async def refused(request):
        access_log.note_refusal("auth", "invalid_api_key")
        return JSONResponse({"error": {}}, status_code=401)

    app = Starlette(routes=[Route("/v1/completions", gen, methods=["POST"]),
                            Route("/v1/chat/completions", boom, methods=["POST"]),
                            Route("/v2/models/m/generate", refused, methods=["POST"]),
                            Route("/health", lambda r: JSONResponse({"status": "ok"}))])
    app.add_middleware(AccessLogMiddleware, lifecycle=lifecycle)
    return app


def test_middleware_request_id_access_line_and_500(caplog):
    life = Lifecycle()
    client = TestClient(_app(life), raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="tokenmill.access"):
        r = client.post("/v1/completions", headers={"x-request-id": "given-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "given-1" and r.text.count("data:") == 3
        r = client.post("/v1/chat/completions")
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and r.headers["x-request-id"]
        r = client.post("/v2/models/m/generate")
        assert r.status_code == 401
        assert client.get("/health").headers["x-request-id"]
    lines = [rec for rec in caplog.records if rec.name == "tokenmill.access"]
    assert [rec.route for rec in lines] == ["/v1/completions", "/v1/chat/completions", "/v2/models/m/generate"]
    ok, failed, refused = lines
    assert (ok.request_id, ok.key_id, ok.status, ok.output_tokens, ok.finish_reason, ok.complete) == (
        "given-1", "k", 200, 3, "length", True)
    assert "request_id=given-1" in ok.getMessage() and "key_id=k" in ok.getMessage()
    assert (failed.status, failed.refusal, failed.code) == (500, "error", "internal_error")
    assert (refused.status, refused.refusal, refused.code) == (401, "auth", "invalid_api_key")
    assert life.requests == 0


def test_lifecycle_refuses_while_draining():
    life = Lifecycle()
    life.check_open()
    life.draining = True
    with pytest.raises(Refusal) as e:
        life.check_open()
    assert (e.value.status, e.value.reason, e.value.code) == (503, "shutting_down", "shutting_down")
    assert "shutting down" in e.value.message


def test_next_or_abort_passes_items_then_aborts_and_closes_the_stream():
    closed = []

    async def outputs():
        try:
            yield 1
            await asyncio.sleep(3600)  # a request that would run on and on
            yield 2
        finally:
            closed.append(True)  # the engine request's abort

    async def main():
        life = Lifecycle()
        it = outputs()
        assert await life.next_or_abort(it) == 1
        waiter = asyncio.create_task(life.next_or_abort(it))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        life.abort_all()
        assert await asyncio.wait_for(waiter, 2) is ABORTED
        assert closed == [True]
        assert await life.next_or_abort(outputs()) is ABORTED  # after the abort: at once
        assert await life.wait_idle(0.1)
        life.jobs = 1
        assert not await life.wait_idle(0.1)

    asyncio.run(main())


def test_a_cancellation_not_from_the_abort_still_cancels():
    async def forever():
        await asyncio.sleep(3600)
        yield 1

    async def main():
        life = Lifecycle()
        waiter = asyncio.create_task(life.next_or_abort(forever()))
        await asyncio.sleep(0.05)
        waiter.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await waiter
        waiter = asyncio.create_task(life.next_or_abort(forever()))
        await asyncio.sleep(0.05)
        life.abort_all()
        waiter.cancel()  # both at once: the client's cancellation is not swallowed
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


def test_next_or_abort_ends_like_anext():
    async def two():
        yield "a"

    async def main():
        life = Lifecycle()
        it = two()
        assert await life.next_or_abort(it) == "a"
        with pytest.raises(StopAsyncIteration):
            await life.next_or_abort(it)

    asyncio.run(main())
