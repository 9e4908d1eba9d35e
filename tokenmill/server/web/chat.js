// The chat page: conversations kept in localStorage, replies streamed from
// POST /v1/chat/completions (SSE), rendered as plain text while streaming and as (safe)
// markdown once finished. Refusals (401 / 429 / 503) are handled by api.js.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const STORE = { convs: "tokenmill.conversations", current: "tokenmill.current",
                  draft: "tokenmill.draft", settings: "tokenmill.settings" };
  const DEFAULTS = { model: "", system: "", temperature: 0.7, topP: 1, maxTokens: 256 };

  const load = (key, fallback) => {
    try { const v = JSON.parse(localStorage.getItem(key)); return v == null ? fallback : v; }
    catch (_) { return fallback; }
  };

  let conversations = load(STORE.convs, []);
  if (!Array.isArray(conversations)) conversations = [];
  let currentId = localStorage.getItem(STORE.current) || null;
  const settings = Object.assign({}, DEFAULTS, load(STORE.settings, {}));
  let controller = null;   // the AbortController of the reply in progress, if any
  let saveTimer = null;

  const current = () => conversations.find((c) => c.id === currentId) || null;

  function saveNow() {
    clearTimeout(saveTimer);
    saveTimer = null;
    localStorage.setItem(STORE.convs, JSON.stringify(conversations));
    if (currentId) localStorage.setItem(STORE.current, currentId);
    else localStorage.removeItem(STORE.current);
  }
  // While streaming, a save per token would re-serialize every conversation each time:
  // batch them (a fraction of a second at most can be lost, and pagehide flushes it).
  function saveSoon() { if (!saveTimer) saveTimer = setTimeout(saveNow, 200); }

  // ---------- rendering ----------

  function renderList() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of [...conversations].sort((a, b) => b.updated - a.updated)) {
      const li = document.createElement("li");
      li.className = "conversation" + (c.id === currentId ? " active" : "");
      li.dataset.id = c.id;
      li.setAttribute("data-testid", "conversation");
      const title = document.createElement("span");
      title.className = "title";
      title.textContent = c.title || "New chat";
      title.title = c.title || "";
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.setAttribute("data-testid", "delete-conversation");
      del.setAttribute("aria-label", "Delete conversation");
      del.textContent = "×";
      del.addEventListener("click", (e) => { e.stopPropagation(); deleteConversation(c.id); });
      li.addEventListener("click", () => openConversation(c.id));
      li.append(title, del);
      list.append(li);
    }
  }

  function messageElement(msg) {
    const el = document.createElement("div");
    el.className = "msg " + msg.role;
    const body = document.createElement("div");
    if (msg.role === "assistant") {
      el.dataset.raw = msg.content;   // the model's text as it came, before markdown
      body.className = "content";
      // Markdown output is built from escaped text only (see markdown.js).
      body.innerHTML = window.renderMarkdown(msg.content);
      el.append(body);
      if (msg.stats || msg.stopped) {
        const stats = document.createElement("div");
        stats.className = "reply-stats";
        stats.textContent = [msg.stats, msg.stopped ? "stopped" : ""].filter(Boolean).join(" · ");
        el.append(stats);
      }
    } else {
      body.className = "text";
      body.textContent = msg.content;   // user text and error messages: never parsed as HTML
      el.append(body);
    }
    return el;
  }

  function markNewestReply() {
    const replies = document.querySelectorAll("#messages .msg.assistant .content");
    replies.forEach((r, i) => {
      if (i === replies.length - 1) r.setAttribute("data-testid", "reply");
      else r.removeAttribute("data-testid");
    });
  }

  function renderMessages() {
    const box = $("messages");
    const conv = current();
    box.replaceChildren();
    if (!conv || !conv.messages.length) box.append(emptyState);
    else for (const m of conv.messages) box.append(messageElement(m));
    markNewestReply();
    box.scrollTop = box.scrollHeight;
  }

  function scrollIfNearBottom() {
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  // ---------- conversations ----------

  function openConversation(id) {
    if (id === currentId) return;
    stop();
    currentId = id;
    saveNow();
    renderList();
    renderMessages();
  }

  function newChat() {
    stop();
    currentId = null;
    saveNow();
    renderList();
    renderMessages();
    $("prompt").focus();
  }

  function deleteConversation(id) {
    if (id === currentId) { stop(); currentId = null; }
    conversations = conversations.filter((c) => c.id !== id);
    saveNow();
    renderList();
    renderMessages();
  }

  // ---------- sending ----------

  // The whole history goes with every request (system prompt first), so the server's prefix
  // cache can serve the earlier turns. Error lines are shown, never sent.
  function requestMessages(conv) {
    const msgs = [];
    if (settings.system.trim()) msgs.push({ role: "system", content: settings.system });
    for (const m of conv.messages) {
      if (m.role === "user" || (m.role === "assistant" && m.content)) msgs.push({ role: m.role, content: m.content });
    }
    return msgs;
  }

  function number(value, fallback) {
    const n = Number(value);
    return value === "" || !Number.isFinite(n) ? fallback : n;
  }

  async function send() {
    const prompt = $("prompt");
    const text = prompt.value;
    if (!text.trim() || controller) return;
    let conv = current();
    if (!conv) {
      conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7),
               title: text.trim().split("\n")[0].slice(0, 60), messages: [], updated: Date.now() };
      conversations.push(conv);
      currentId = conv.id;
    }
    conv.messages.push({ role: "user", content: text });
    conv.updated = Date.now();
    prompt.value = "";
    localStorage.removeItem(STORE.draft);
    saveNow();
    renderList();
    renderMessages();
    await generate(conv);
  }

  async function generate(conv) {
    controller = new AbortController();
    const mine = controller;
    setBusy(true);
    const body = {
      model: settings.model || $("model").value, messages: requestMessages(conv), stream: true,
      stream_options: { include_usage: true },
      temperature: number(settings.temperature, DEFAULTS.temperature),
      top_p: number(settings.topP, DEFAULTS.topP),
      max_tokens: Math.round(number(settings.maxTokens, DEFAULTS.maxTokens)),
    };
    const reply = { role: "assistant", content: "" };
    let tSend = performance.now(), tFirst = 0, chunks = 0, usage = null, live = null;
    try {
      const res = await window.TM.apiFetch("/v1/chat/completions", {
        method: "POST", body, signal: mine.signal, onAttempt: () => { tSend = performance.now(); },
      });
      // The server let us in: only now does the reply exist (a refused try leaves no trace).
      conv.messages.push(reply);
      const el = messageElement(reply);
      el.classList.add("streaming");
      $("messages").append(el);
      live = el.querySelector(".content");
      markNewestReply();

      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      read: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const lines = buffer.split("\n");
        buffer = lines.pop();   // an incomplete line waits for the next read
        for (const raw of lines) {
          const line = raw.trim();
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") break read;
          const chunk = JSON.parse(data);
          // A streamed error replaces a chunk (OpenAI's shape): keep what came, show the error.
          if (chunk.error) throw new window.TM.ApiError(chunk.error.message || String(chunk.error), 500);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (!tFirst) tFirst = performance.now();
            chunks += 1;
            reply.content += delta.content;
            live.textContent = reply.content;   // plain text while streaming; markdown at the end
            saveSoon();
            scrollIfNearBottom();
          }
        }
      }
      reply.stats = replyStats(tSend, tFirst, performance.now(), usage ? usage.completion_tokens : chunks);
    } catch (e) {
      if (e && e.name === "AbortError") {
        if (conv.messages.includes(reply)) reply.stopped = true;
      } else {
        conv.messages.push({ role: "error", content: (e && e.message) || String(e) });
      }
    } finally {
      if (!reply.content && conv.messages.includes(reply) && !reply.stopped && !reply.stats) {
        conv.messages.splice(conv.messages.indexOf(reply), 1);
      }
      conv.updated = Date.now();
      if (controller === mine) controller = null;
      setBusy(false);
      saveNow();
      if (current() === conv) renderMessages();
    }
  }

  // TTFT: first content delta minus the send of the try that got in. Tokens/s: completion
  // tokens (from usage) over the streaming time, first token to end; for a reply that came in
  // one piece that time is ~0, so the whole request time is used instead.
  function replyStats(tSend, tFirst, tEnd, tokens) {
    if (!tFirst) return "no tokens";
    let secs = (tEnd - tFirst) / 1000;
    if (secs < 0.001) secs = (tEnd - tSend) / 1000;
    const parts = ["TTFT " + Math.round(tFirst - tSend) + " ms"];
    if (secs > 0) parts.push((tokens / secs).toFixed(1) + " tok/s");
    parts.push(tokens + (tokens === 1 ? " token" : " tokens"));
    return parts.join(" · ");
  }

  function stop() {
    if (controller) controller.abort();
  }

  // ---------- models and settings ----------

  async function loadModels() {
    const select = $("model");
    try {
      const res = await window.TM.apiFetch("/v1/models");
      const ids = ((await res.json()).data || []).map((m) => m.id);
      select.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (ids.includes(settings.model)) select.value = settings.model;
      else { settings.model = ids[0] || ""; saveSettings(); }
    } catch (e) {
      select.replaceChildren(new Option("(models unavailable: " + ((e && e.message) || e) + ")", ""));
    }
  }

  function saveSettings() { localStorage.setItem(STORE.settings, JSON.stringify(settings)); }

  const SETTING_INPUTS = { model: "model", system: "system", temperature: "temperature",
                           topP: "top-p", maxTokens: "max-tokens" };

  function bindSettings() {
    for (const [name, id] of Object.entries(SETTING_INPUTS)) {
      const input = $(id);
      if (name !== "model") input.value = settings[name];
      const update = () => { settings[name] = input.value; saveSettings(); };
      input.addEventListener("input", update);
      input.addEventListener("change", update);
    }
  }

  // ---------- wiring ----------

  const emptyState = $("empty-state");
  const prompt = $("prompt");
  prompt.value = localStorage.getItem(STORE.draft) || "";
  prompt.addEventListener("input", () => localStorage.setItem(STORE.draft, prompt.value));
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  window.addEventListener("pagehide", () => { if (saveTimer) saveNow(); });
  window.addEventListener("storage", (e) => {
    // Another tab changed the conversations: pick them up unless this tab is mid-reply.
    if (e.key === STORE.convs && !controller) { conversations = load(STORE.convs, []); renderList(); renderMessages(); }
  });

  if (currentId && !current()) currentId = null;
  bindSettings();
  renderList();
  renderMessages();
  setBusy(false);
  loadModels();
})();
