// Sending a message and streaming its reply (over chat.js's state, window.TMChat); the model
// list (with each model's max_model_len, for trimming the history) and the settings inputs.
(function () {
  "use strict";

  const C = window.TMChat;
  const settings = C.settings;
  const $ = (id) => document.getElementById(id);

  function number(value, fallback) {
    const n = Number(value);
    return value === "" || !Number.isFinite(n) ? fallback : n;
  }
  const selectedModel = () => settings.model || $("model").value;

  function finishSend(mine) {
    if (C.getController() === mine) C.setController(null);
    C.prompt.readOnly = false;
    C.setBusy(false);
  }

  async function send() {
    const prompt = C.prompt;
    const text = prompt.value;
    if (!text.trim() || C.getController()) return;
    const mine = new AbortController();
    C.setController(mine, null);
    C.setBusy(true);
    C.hideNotice();
    // No model (say /v1/models failed while the server restarted, or its key dialog was
    // cancelled): ask again now; the message stays in the composer if there is still none.
    if (!selectedModel()) await loadModels();
    if (mine.signal.aborted) return finishSend(mine);
    if (!selectedModel()) {
      C.notice("Not sent: no model to send to (" + (modelsError || "the server lists none") +
               "). Your message is kept.", true);
      return finishSend(mine);
    }
    const conv = C.current() || C.newConversation(text.trim().split("\n")[0].slice(0, 60));
    C.setController(mine, conv);
    const turn = { role: "user", content: text, pending: C.TAB, at: Date.now() };
    conv.messages.push(turn);
    C.touch(conv);
    prompt.readOnly = true;   // the text stays here, as it is, until the server accepts it
    C.saveNow();
    C.renderList();
    C.renderMessages();
    await generate(conv, turn, mine);
  }

  async function generate(conv, turn, mine) {
    const DEFAULTS = C.DEFAULTS;
    const model = selectedModel();
    const maxTokens = Math.round(number(settings.maxTokens, DEFAULTS.maxTokens));
    const built = window.TMStream.requestMessages(conv, {
      system: settings.system, sending: turn, maxModelLen: models[model] || 0, maxTokens });
    const body = {
      model, messages: built.messages, stream: true, stream_options: { include_usage: true },
      temperature: number(settings.temperature, DEFAULTS.temperature),
      top_p: number(settings.topP, DEFAULTS.topP), max_tokens: maxTokens,
    };
    const reply = { role: "assistant", content: "" };
    let tSend = performance.now(), tFirst = 0, chunks = 0, accepted = false;
    try {
      const res = await window.TM.apiFetch("/v1/chat/completions", {
        method: "POST", body, signal: mine.signal, onAttempt: () => { tSend = performance.now(); },
      });
      // The server let us in: the turn is part of the history now, and the composer is free.
      accepted = true;
      delete turn.pending;
      delete turn.at;
      C.prompt.readOnly = false;
      if (C.prompt.value === turn.content) C.setDraft("");
      reply.streaming = C.TAB;
      if (built.dropped) reply.dropped = built.dropped;
      conv.messages.push(reply);
      C.touch(conv);
      C.saveNow();
      let live = null;
      if (C.current() === conv) {
        C.renderMessages();
        live = document.querySelector("#messages .msg.assistant:last-child");
        live.classList.add("streaming");
        live = live.querySelector(".content");
      }
      const r = await window.TMStream.readStream(res, (piece) => {
        if (!tFirst) tFirst = performance.now();
        chunks += 1;
        reply.content += piece;
        if (live && live.isConnected) live.textContent = reply.content;   // plain text while streaming
        C.touch(conv);
        C.saveSoon();
        C.scrollIfNearBottom();
      });
      if (!r.complete) reply.interrupted = true;   // closed without [DONE]: cut off
      if (r.usage && r.usage.completion_tokens > 0) reply.tokens = r.usage.completion_tokens;
      reply.stats = window.TMStream.replyStats(tSend, tFirst, performance.now(),
                                               r.usage ? r.usage.completion_tokens : chunks);
    } catch (e) {
      const aborted = e && e.name === "AbortError";
      if (!accepted) {
        // Refused, cancelled or failed before the server took it: not part of the history.
        // An error line keeps the conversation; a cancel of its only message removes it.
        if (!aborted) conv.messages.push({ role: "error", content: "Not sent: " + describe(e) });
        C.unsend(conv, turn);
        C.restoreText(turn.content);
      } else if (aborted) {
        reply.stopped = true;
      } else {
        conv.messages.push({ role: "error", content: describe(e) });
      }
    } finally {
      delete reply.streaming;
      if (accepted && !reply.content && !reply.stopped && !reply.stats && !reply.interrupted) {
        conv.messages.splice(conv.messages.indexOf(reply), 1);
      }
      if (C.conversations().includes(conv)) C.touch(conv);
      finishSend(mine);
      C.saveNow();
      C.renderList();
      if (C.current() === conv || !C.current()) C.renderMessages();
      if (!accepted) C.prompt.focus();
    }
  }

  function describe(e) {
    const text = (e && e.message) || String(e);
    if (e && e.code === "context_length_exceeded") {
      return text + " (the conversation is too long for this model: start a new chat or lower max tokens)";
    }
    return text;
  }

  // ---------- models and settings ----------

  let models = {};          // model id -> max_model_len (0: unknown), from /v1/models
  let modelsError = "";     // why the last /v1/models failed

  async function loadModels() {
    const select = $("model");
    try {
      const res = await window.TM.apiFetch("/v1/models");
      const data = (await res.json()).data || [];
      models = Object.fromEntries(data.map((m) => [m.id, Number(m.max_model_len) || 0]));
      const ids = Object.keys(models);
      modelsError = ids.length ? "" : "the server lists no models";
      select.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (ids.includes(settings.model)) select.value = settings.model;
      else { settings.model = ids[0] || ""; saveSettings(); }
    } catch (e) {
      modelsError = (e && e.message) || String(e);
      if (!Object.keys(models).length) select.replaceChildren(new Option("(models unavailable: " + modelsError + ")", ""));
    }
  }

  const saveSettings = () => C.saveSettings();

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

  window.TMSend = { send };
  window.addEventListener("tokenmill:key-saved", () => loadModels());   // a key may open /v1/models
  bindSettings();
  loadModels();
})();
