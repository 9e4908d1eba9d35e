// Requests to the tokenmill server, with the ways a request can be turned away handled in one
// place so the chat page only ever sees "it worked", "it failed with this message" or "aborted":
//   401 -> the API key dialog; the request is retried with the saved key.
//   503 -> the full-page "at capacity" screen with a countdown, then an automatic retry.
//   429 -> the rate-limit banner with a countdown, then an automatic retry.
// Everything is same-origin, so the Retry-After header is readable by fetch.
(function () {
  "use strict";

  const KEY_STORAGE = "tokenmill.apiKey";
  const MAX_BACKOFF_S = 30;
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  const abortError = () => new DOMException("The request was aborted", "AbortError");

  function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

  // The OpenAI error body's message ({"error": {"message"}}), or KServe's ({"error": "..."}),
  // or the status line when the body is not JSON.
  async function errorMessage(res) {
    const text = await res.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && body.error) return typeof body.error === "string" ? body.error : body.error.message || text;
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (_) { /* not JSON */ }
    return text || res.status + " " + res.statusText;
  }

  // Retry-After is delta-seconds or an HTTP date; missing or unreadable means "soon" (2 s).
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
          localStorage.setItem(KEY_STORAGE, input.value.trim());
          done(true);
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
        if (capacity) {
          $("capacity-retry").removeEventListener("click", onRetry);
          $("capacity-cancel").removeEventListener("click", onAbort);
        }
        // The box stays up during the retry itself; apiFetch hides it once the server lets us in.
        then();
      }
      if (signal) {
        if (signal.aborted) return onAbort();
        signal.addEventListener("abort", onAbort);
      }
      if (capacity) {
        $("capacity-retry").addEventListener("click", onRetry);
        $("capacity-cancel").addEventListener("click", onAbort);
      }
    });
  }

  function hideRetryScreens() {
    $("capacity").hidden = true;
    $("rate-limit").hidden = true;
  }

  // fetch() that resolves only with an ok Response. `onAttempt` is called just before each try
  // (the chat page measures time to first token from the try that got in).
  async function apiFetch(path, { method = "GET", body, signal, onAttempt } = {}) {
    const tries = { capacity: 0, rate_limit: 0 };
    try {
      for (;;) {
        const headers = {};
        if (body !== undefined) headers["Content-Type"] = "application/json";
        const key = apiKey();
        if (key) headers["Authorization"] = "Bearer " + key;
        if (onAttempt) onAttempt();
        const res = await fetch(path, {
          method, headers, signal,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
        if (res.ok) return res;
        if (res.status === 401) {
          await askForKey(await errorMessage(res));
          continue;
        }
        if (res.status === 503 || res.status === 429) {
          const kind = res.status === 503 ? "capacity" : "rate_limit";
          const ra = retryAfterSeconds(res);
          // Back off: Retry-After first, then doubling (but never under Retry-After, at most 30 s).
          const wait = Math.max(ra, Math.min(MAX_BACKOFF_S, ra * 2 ** tries[kind]));
          tries[kind] += 1;
          const message = await errorMessage(res);
          if (kind === "capacity") $("rate-limit").hidden = true;
          else $("capacity").hidden = true;
          await waitToRetry(kind, message, wait, signal);
          continue;
        }
        throw new ApiError(await errorMessage(res), res.status);
      }
    } finally {
      hideRetryScreens();
    }
  }

  window.TM = { apiFetch, ApiError, apiKey };
})();
