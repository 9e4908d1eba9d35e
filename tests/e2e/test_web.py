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

    def no_early_end(route):  # the demo model may otherwise end its reply (EOS) before Stop
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", no_early_end)
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


# ---------- faked answers (page.route): refusals, two tabs, markdown ----------

def _sse(*parts: str, done: bool = True) -> str:
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in parts]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if done else "")


def _ok(route, *parts: str) -> None:
    route.fulfill(status=200, body=_sse(*parts), headers={"Content-Type": "text/event-stream"})


def _refuse(route, status: int, message: str, retry_after: str | None = None) -> None:
    headers = {"Content-Type": "application/json", **({"Retry-After": retry_after} if retry_after else {})}
    route.fulfill(status=status, headers=headers, body=json.dumps({"error": {"message": message}}))


def _open(pg, url: str) -> None:
    pg.goto(url + "/")
    pg.wait_for_function("document.querySelector('#model').options.length > 0 && "
                         "document.querySelector('#model').value !== ''")


def _sent_messages(pg) -> list[list[dict]]:
    """The messages of every chat request the page makes, in order."""
    sent: list[list[dict]] = []
    pg.on("request", lambda r: sent.append(json.loads(r.post_data)["messages"])
          if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    return sent


def _stored_titles(pg) -> list[str]:
    return sorted(pg.evaluate("Object.keys(localStorage).filter(k => k.startsWith('tokenmill.conv.'))"
                              ".map(k => JSON.parse(localStorage.getItem(k)).title)"))


def test_two_tabs_keep_each_others_conversations(browser, server):
    ctx = browser.new_context()
    try:
        a, b = ctx.new_page(), ctx.new_page()
        held = []  # tab A's request waits (A is mid-send) while tab B sends and finishes
        a.route("**/v1/chat/completions", lambda route: held.append(route))
        b.route("**/v1/chat/completions", lambda route: _ok(route, "reply to B"))
        _open(a, server.url)
        _open(b, server.url)
        _send(a, "from tab A")
        a.wait_for_function("document.body.classList.contains('busy')")
        deadline = time.time() + 10
        while not held and time.time() < deadline:
            a.wait_for_timeout(50)
        b.click("#new-chat")
        _send(b, "from tab B")
        b.locator(".msg.assistant .reply-stats").wait_for()
        _ok(held[0], "reply to A")
        a.locator(".msg.assistant .reply-stats").wait_for()
        a.wait_for_timeout(300)  # the storage events reach the other tab
        for pg in (a, b):
            titles = pg.evaluate("[...document.querySelectorAll('#conversations .title')].map(t => t.textContent)")
            assert sorted(titles) == ["from tab A", "from tab B"]
            assert _stored_titles(pg) == ["from tab A", "from tab B"]
        # A stale copy never overwrites a newer one.
        assert a.evaluate("""() => { const id = Object.keys(localStorage).find(k => k.startsWith('tokenmill.conv.'))
            .slice('tokenmill.conv.'.length); const c = TMStore.getJSON('tokenmill.conv.' + id);
            return TMStore.save(Object.assign({}, c, {updated: c.updated - 1, messages: []}), []).ok; }""") is False
        # The old single key is split into one key per conversation.
        a.evaluate("""localStorage.setItem('tokenmill.conversations', JSON.stringify([{id: 'old1', title: 'old one',
            messages: [{role: 'user', content: 'x'}], updated: 1}]))""")
        _open(a, server.url)
        assert "old one" in _stored_titles(a) and a.evaluate("localStorage.getItem('tokenmill.conversations')") is None
    finally:
        ctx.close()


def test_cancel_at_capacity_keeps_the_message_out_of_the_history(page, server):
    sent = _sent_messages(page)
    state = {"refuse": True}
    page.route("**/v1/chat/completions", lambda route: _refuse(route, 503, "at capacity (limit 1)", "30")
               if state["refuse"] else _ok(route, "hello"))
    _open(page, server.url)
    _send(page, "cancel me")
    page.wait_for_selector("#capacity", state="visible")
    assert page.locator(".msg.user.pending").count() == 1
    # The overlay has the focus and keeps it: Retry now, Tab to Cancel, Tab back to Retry now.
    assert page.evaluate("document.activeElement.id") == "capacity-retry"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "capacity-cancel"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "capacity-retry"
    page.click("#capacity-cancel")
    page.wait_for_selector("#capacity", state="hidden")
    assert page.input_value("#prompt") == "cancel me" and page.locator(".msg.user").count() == 0
    assert page.evaluate("document.activeElement.id") == "prompt"
    # Escape is Cancel too.
    _send(page, "cancel me")
    page.wait_for_selector("#capacity", state="visible")
    page.keyboard.press("Escape")
    page.wait_for_selector("#capacity", state="hidden")
    assert page.input_value("#prompt") == "cancel me"
    # A reload during the wait: the message comes back into the composer, with a notice.
    _send(page, "reloaded")
    page.wait_for_selector("#capacity", state="visible")
    _open(page, server.url)
    assert page.input_value("#prompt") == "reloaded" and page.locator(".msg.user").count() == 0
    assert "not sent yet" in page.inner_text("#notice").lower()
    state["refuse"] = False
    _send(page, "the real one")
    _last_reply(page)
    assert page.input_value("#prompt") == ""
    assert sent[-1] == [{"role": "user", "content": "the real one"}]
    assert all(m["content"] in ("cancel me", "reloaded", "the real one") for msgs in sent for m in msgs)
    assert sum(len(msgs) for msgs in sent[:-1]) == len(sent) - 1  # each refused try carried only its turn


def test_a_refusal_without_retry_after_is_final(page, server):
    sent = _sent_messages(page)
    state = {"status": 429, "retry": None}
    page.route("**/v1/chat/completions", lambda route: _refuse(
        route, state["status"], "needs 268 tokens, allows 100: it can never fit", state["retry"]))
    _open(page, server.url)
    _send(page, "never fits")
    page.locator(".msg.error").wait_for()
    assert "can never fit" in page.inner_text(".msg.error")
    assert page.locator("#rate-limit").is_hidden() and page.locator("#capacity").is_hidden()
    assert page.input_value("#prompt") == "never fits" and page.locator(".msg.user").count() == 0
    page.wait_for_timeout(300)
    assert len(sent) == 1
    # Stop during a 429 wait WITH Retry-After: the same, the message back in the composer.
    state["retry"] = "30"
    page.click("#send")
    page.wait_for_selector("#rate-limit", state="visible")
    page.click("#stop")
    page.wait_for_selector("#rate-limit", state="hidden")
    assert page.input_value("#prompt") == "never fits" and page.locator(".msg.user").count() == 0


def test_models_are_asked_for_again_and_streams_are_read_to_the_end(page, server):
    fail = {"models": True}

    def models(route):
        if fail["models"]:
            route.fulfill(status=500, body="restarting")
        else:
            route.continue_()

    page.route("**/v1/models", models)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=_sse("abc", done=False) + 'data: {"choices":[{"index":0,"delta":{"content":"def"}}]}'))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').textContent.includes('unavailable')")
    _send(page, "hello")
    page.wait_for_selector("#notice", state="visible")
    assert "no model" in page.inner_text("#notice").lower() and page.input_value("#prompt") == "hello"
    fail["models"] = False
    page.click("#send")
    assert _last_reply(page) == "abcdef"  # the last line had no newline, and there was no [DONE]
    assert "interrupted" in page.locator(".msg.assistant .reply-stats").inner_text()


def test_markdown_links_and_loose_lists(page, server):
    page.goto(server.url + "/")
    html = page.evaluate("(t) => renderMarkdown(t)",
                         "See [the docs](https://docs.python.org/3/reference/datamodel.html#object.__init__) "
                         "and [**bold** link](https://example.com/a_b_c) for my_flag_.")
    assert 'href="https://docs.python.org/3/reference/datamodel.html#object.__init__"' in html
    assert 'href="https://example.com/a_b_c" target="_blank"' in html
    assert "<strong>bold</strong> link</a>" in html and "<em>" not in html
    loose = page.evaluate("(t) => renderMarkdown(t)", "1. Install it\n\n2. Run it\n\n3. Done")
    assert loose == "<ol><li>Install it</li><li>Run it</li><li>Done</li></ol>"
    broken = page.evaluate("(t) => renderMarkdown(t)", "1. one\n\n```\ncode\n```\n\n2. two\n3. three")
    assert broken.endswith('<ol start="2"><li>two</li><li>three</li></ol>')
