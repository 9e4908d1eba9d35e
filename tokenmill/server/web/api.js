// Requests to the tokenmill server, with the ways a request can be turned away handled in one
// place so the chat page only ever sees "it worked", "it failed with this message" or "aborted":
//   401 -> the API key dialog; the request is retried with the saved key.
//   503 -> the full-page "at capacity" screen with a countdown, then an automatic retry.
//   429 -> the rate-limit banner with a countdown, then an automatic retry.
//   A 429 or 503 WITHOUT Retry-After is final (e.g. a prompt that can never fit): an error.
// Everything is same-origin, so the Retry-After header is readable by fetch.
(function () {
  "use strict";

  const KEY_STORAGE = "tokenmill.apiKey";
  const MAX_BACKOFF_S = 30;
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code || null; }
  }

  const abortError = () => new DOMException("The request was aborted", "AbortError");

  function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

  // The OpenAI error body's message and code ({"error": {"message", "code"}}), or KServe's
  // ({"error": "..."}), or the status line when the body is not JSON: { message, code }.
  async function errorInfo(res) {
    const text = await res.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      const e = body && body.error;
      if (e) return typeof e === "string" ? { message: e } : { message: e.message || text, code: e.code };
      if (body && body.detail) return { message: typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail) };
    } catch (_) { /* not JSON */ }
    return { message: text || res.status + " " + res.statusText };
  }
  const errorMessage = async (res) => (await errorInfo(res)).message;

  // Retry-After is delta-seconds or an HTTP date; unreadable means "soon" (2 s).
  function retryAfterSeconds(res) {
    const h = res.headers.get("Retry-After");
    if (!h) return 2;
    const n = Number(h);
    if (Number.isFinite(n)) return Math.max(1, Math.ceil(n));
    const at = Date.parse(h);
    return Number.isFinite(at) ? Math.max(1, Math.ceil((at - Date.now()) / 1000)) : 2;
  }

  // ---- API key dialog: every request that got a 401 waits on the same prompt. ----
  let keyPrompt = null;
  function askForKey(message) {
    $("key-message").textContent = "This server needs an API key: " + message;
    if (!keyPrompt) {
      keyPrompt = new Promise((resolve, reject) => {
        const dialog = $("key-dialog"), input = $("api-key"), form = $("key-form");
        input.value = apiKey();
        dialog.hidden = false;
        input.focus();
        const done = (ok) => {
          form.removeEventListener("submit", onSave);
          $("cancel-key").removeEventListener("click", onCancel);
          dialog.hidden = true;
          keyPrompt = null;
          ok ? resolve() : reject(new ApiError("This server needs an API key: " + message, 401));
        };
        const onSave = (e) => {
          e.preventDefault();
          try { localStorage.setItem(KEY_STORAGE, input.value.trim()); } catch (_) { /* storage full */ }
          done(true);
          window.dispatchEvent(new Event("tokenmill:key-saved"));
        };
        const onCancel = () => done(false);
        form.addEventListener("submit", onSave);
        $("cancel-key").addEventListener("click", onCancel);
      });
    }
    return keyPrompt;
  }

  // ---- Countdown before a retry: the capacity screen (503) or the rate-limit banner (429). ----
  function waitToRetry(kind, message, seconds, signal) {
    const capacity = kind === "capacity";
    const box = capacity ? $("capacity") : $("rate-limit");
    const counter = capacity ? $("capacity-countdown") : $("rate-limit-countdown");
    (capacity ? $("capacity-reason") : $("rate-limit-message")).textContent = message;
    return new Promise((resolve, reject) => {
      let left = seconds;
      counter.textContent = String(left);
      box.hidden = false;
      const timer = setInterval(() => {
        left -= 1;
        counter.textContent = String(Math.max(0, left));
        if (left <= 0) finish(resolve);
      }, 1000);
      const onAbort = () => finish(() => reject(abortError()));
      const onRetry = () => finish(resolve);
      function finish(then) {
        clearInterval(timer);
        signal && signal.removeEventListener("abort", onAbort);
        if (capacity) $("capacity-retry").removeEventListener("click", onRetry);
        // The box stays up during the retry itself; apiFetch hides it once the server lets us in.
        then();
      }
      if (signal) {
        if (signal.aborted) return onAbort();
        signal.addEventListener("abort", onAbort);
      }
      if (capacity) $("capacity-retry").addEventListener("click", onRetry);
    });
  }

  // The capacity screen is modal while it is up: "Retry now" takes the focus, Tab stays on its
  // buttons, Escape or Cancel gives up (cancel()); on close the focus goes back to the composer.
  function openCapacity(cancel) {
    const box = $("capacity"), buttons = [$("capacity-retry"), $("capacity-cancel")];
    const onKey = (e) => {
      if (box.hidden) return;
      if (e.key === "Escape") { e.preventDefault(); cancel(); }
      else if (e.key === "Tab") {
        e.preventDefault();
        const i = buttons.indexOf(document.activeElement);
        buttons[i < 0 ? 0 : (i + (e.shiftKey ? buttons.length - 1 : 1)) % buttons.length].focus();
      }
    };
    document.addEventListener("keydown", onKey, true);
    buttons[1].addEventListener("click", cancel);
    box.hidden = false;
    buttons[0].focus();
    return () => {
      document.removeEventListener("keydown", onKey, true);
      buttons[1].removeEventListener("click", cancel);
      box.hidden = true;
      const composer = $("prompt");
      if (composer) composer.focus();
    };
  }

  function hideRetryScreens() {
    $("capacity").hidden = true;
    $("rate-limit").hidden = true;
  }

  // fetch() that resolves only with an ok Response. `onAttempt` is called just before each try
  // (the chat page measures time to first token from the try that got in).
  async function apiFetch(path, { method = "GET", body, signal, onAttempt } = {}) {
    const tries = { capacity: 0, rate_limit: 0 };
    // The caller's signal, and the capacity screen's Cancel, abort the tries, the waits and
    // (after the return) the body. The forwarding stays: Stop must still work mid-stream.
    const inner = new AbortController();
    if (signal) {
      if (signal.aborted) inner.abort();
      else signal.addEventListener("abort", () => inner.abort(), { once: true });
    }
    let closeCapacity = null;
    try {
      for (;;) {
        const headers = {};
        if (body !== undefined) headers["Content-Type"] = "application/json";
        const key = apiKey();
        if (key) headers["Authorization"] = "Bearer " + key;
        if (onAttempt) onAttempt();
        const res = await fetch(path, {
          method, headers, signal: inner.signal,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
        if (res.ok) return res;
        if (res.status === 401) {
          await askForKey(await errorMessage(res));
          continue;
        }
        if ((res.status === 503 || res.status === 429) && !res.headers.get("Retry-After")) {
          // No Retry-After: the server does not expect a retry to help. Final.
          const info = await errorInfo(res);
          throw new ApiError(info.message, res.status, info.code);
        }
        if (res.status === 503 || res.status === 429) {
          const kind = res.status === 503 ? "capacity" : "rate_limit";
          const ra = retryAfterSeconds(res);
          // Back off: Retry-After first, then doubling (but never under Retry-After, at most 30 s).
          const wait = Math.max(ra, Math.min(MAX_BACKOFF_S, ra * 2 ** tries[kind]));
          tries[kind] += 1;
          const message = await errorMessage(res);
          if (kind === "capacity") {
            $("rate-limit").hidden = true;
            if (!closeCapacity) closeCapacity = openCapacity(() => inner.abort());
          } else if (closeCapacity) { closeCapacity(); closeCapacity = null; }
          await waitToRetry(kind, message, wait, inner.signal);
          continue;
        }
        const info = await errorInfo(res);
        throw new ApiError(info.message, res.status, info.code);
      }
    } finally {
      if (closeCapacity) closeCapacity();
      hideRetryScreens();
    }
  }

  window.TM = { apiFetch, ApiError, apiKey };
})();
