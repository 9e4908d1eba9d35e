"""The chat page, the capacity page and the dashboard in a real browser: Debian's chromium,
headless, driven by Playwright. Without chromium the tests skip, naming the package to install.

Set TOKENMILL_SCREENSHOTS=docs to save the README's screenshots (docs/web-*.png) while they run."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package: apt-get install chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors  # no uncaught JavaScript error on any page


def _screenshot(pg, name: str) -> None:
    if os.environ.get("TOKENMILL_SCREENSHOTS") == "docs":
        pg.screenshot(path=str(DOCS / f"web-{name}.png"))


def _settings(pg, temperature: str = "0", max_tokens: str = "24") -> None:
    pg.fill("#temperature", temperature)
    pg.fill("#max-tokens", max_tokens)


def _send(pg, text: str) -> None:
    pg.fill("#prompt", text)
    pg.click("#send")


def _last_reply(pg, timeout: float = 60_000) -> str:
    """The newest assistant reply's text once it has finished (its stats line appears)."""
    reply = pg.locator(".msg.assistant").last
    reply.locator(".reply-stats").wait_for(timeout=timeout)
    return reply.get_attribute("data-raw")


def _metric(server: Server, name: str) -> float:
    return server.metrics()[name]


def test_a_message_gets_the_api_s_greedy_reply_streamed(page, server):
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    _settings(page)
    _send(page, "What is a list?")
    text = _last_reply(page)
    api = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": [{"role": "user", "content": "What is a list?"}],
        "temperature": 0, "max_tokens": 24, "top_p": 1}).json()
    assert text == api["choices"][0]["message"]["content"]
    stats = page.locator(".msg.assistant").last.locator(".reply-stats").inner_text()
    assert "TTFT" in stats and "tok/s" in stats
    # The second turn resends the history: the prefix cache serves the first turn.
    hits = _metric(server, "tokenmill:prefix_cache_hits_total")
    _send(page, "And a tuple?")
    _last_reply(page)
    assert _metric(server, "tokenmill:prefix_cache_hits_total") > hits
    assert page.locator(".msg.user").count() == 2
    _screenshot(page, "chat")
    # Conversations are kept in the browser: a new chat, then the old one reopened.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.locator("#conversations li").first.click()
    assert page.locator(".msg.user").count() == 2


def test_stop_mid_stream_frees_the_kv_blocks(page, server):
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    _settings(page, temperature="0.8", max_tokens="900")
    aborted = _metric(server, "tokenmill:request_success_total{finished_reason=abort}")
    _send(page, "Write a long story.")
    page.wait_for_function("[...document.querySelectorAll('.msg.assistant')].some(m => m.textContent.length > 20)")
    assert _metric(server, "tokenmill:num_requests_running") == 1
    page.click("#stop")
    deadline = time.time() + 10
    while time.time() < deadline and (_metric(server, "tokenmill:kv_cache_usage_perc") > 0
                                      or _metric(server, "tokenmill:num_requests_running") > 0):
        time.sleep(0.1)
    assert _metric(server, "tokenmill:kv_cache_usage_perc") == 0
    assert _metric(server, "tokenmill:request_success_total{finished_reason=abort}") == aborted + 1


def test_model_output_with_html_is_shown_as_text(page, server):
    evil = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> **bold** `code`'

    def fake_stream(route):
        chunks = [{"choices": [{"index": 0, "delta": {"content": part}, "finish_reason": None}]}
                  for part in (evil[:20], evil[20:])]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"})

    page.route("**/v1/chat/completions", fake_stream)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    _send(page, "show me html")
    assert _last_reply(page) == evil
    reply = page.locator(".msg.assistant").last
    assert "<script>window.__pwned = 1</script>" in reply.inner_text()
    assert reply.locator("script, img").count() == 0 and reply.locator("strong, code").count() == 2
    assert page.evaluate("window.__pwned") is None


@pytest.fixture(scope="module")
def tight_server():
    s = Server("--max-num-queued-reqs", "1")
    yield s
    s.stop()


def test_at_capacity_the_page_says_so_then_recovers(page, tight_server):
    url = tight_server.url
    long = {"model": "demo", "prompt": "A long one", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    done = threading.Event()
    threading.Thread(target=lambda: (httpx.post(f"{url}/v1/completions", json=long, timeout=120), done.set()),
                     daemon=True).start()
    deadline = time.time() + 20
    while tight_server.metrics()["tokenmill:num_requests_running"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    _settings(page)
    _send(page, "Are you there?")
    page.wait_for_selector("#capacity", state="visible", timeout=10_000)
    assert "at capacity" in page.inner_text("#capacity").lower()
    assert "limit 1" in page.inner_text("#capacity-reason")
    assert page.inner_text("#capacity-countdown").strip()
    _screenshot(page, "capacity")
    assert not done.is_set()
    reply = _last_reply(page, timeout=120_000)  # retried by itself once the long request is done
    assert done.is_set() and reply
    assert page.locator("#capacity").is_hidden()
    assert page.locator(".msg.user").count() == 1  # the message was kept, and sent once
    assert tight_server.metrics()["tokenmill:admission_rejections_total{reason=capacity}"] >= 1


@pytest.fixture(scope="module")
def keyed_server():
    s = Server("--api-key", "sesame")
    yield s
    s.stop()


def test_keys_are_asked_for_and_sent(page, keyed_server):
    page.goto(keyed_server.url + "/")
    page.wait_for_selector("#key-dialog", state="visible", timeout=10_000)
    assert "api key" in page.inner_text("#key-dialog").lower()
    page.fill("#api-key", "wrong")
    page.click("#save-key")
    page.wait_for_function("document.querySelector('#key-dialog').innerText.toLowerCase().includes('invalid')")
    page.fill("#api-key", "sesame")
    page.click("#save-key")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#key-dialog").is_hidden()
    _settings(page)
    _send(page, "Hello")
    assert _last_reply(page)


def test_the_dashboard_matches_metrics_under_load(page, server):
    shots = os.environ.get("TOKENMILL_SCREENSHOTS") == "docs"  # a longer load, so the charts have lines
    body = {"model": "demo", "prompt": "Load", "max_tokens": 900 if shots else 300, "ignore_eos": True,
            "temperature": 0}
    threads = [threading.Thread(target=httpx.post, args=(f"{server.url}/v1/completions",),
                                kwargs={"json": body, "timeout": 120}, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while server.metrics()["tokenmill:num_requests_running"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    page.goto(server.url + "/dashboard")
    page.wait_for_function("document.querySelector('[data-metric=num_requests_running] .value')"
                           ".textContent.trim() === '3'", timeout=10_000)
    m = server.metrics()

    def tile(name: str) -> str:
        return page.inner_text(f"[data-metric={name}] .value")

    assert m["tokenmill:num_requests_running"] == 3 and tile("num_requests_running") == "3"
    assert tile("num_requests_waiting") == str(int(m["tokenmill:num_requests_waiting"]))
    assert tile("num_preemptions_total") == str(int(m["tokenmill:num_preemptions_total"]))
    assert abs(float(tile("kv_cache_usage_perc").rstrip("%")) - 100 * m["tokenmill:kv_cache_usage_perc"]) < 5
    page.wait_for_function("parseFloat(document.querySelector('[data-metric=generation_tokens_per_s] .value')"
                           ".textContent) > 0", timeout=10_000)
    assert "busy" in page.inner_text("#load-status").lower() or "loaded" in page.inner_text("#load-status").lower()
    if shots:
        time.sleep(6)
    _screenshot(page, "dashboard")
    for t in threads:
        t.join(120)
