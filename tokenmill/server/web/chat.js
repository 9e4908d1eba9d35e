// The chat page: conversations kept in localStorage (storage.js), replies streamed from
// POST /v1/chat/completions (send.js, stream.js), rendered as plain text while streaming and as (safe)
// markdown once finished. Refusals (401 / 429 / 503) are handled by api.js.
//
// A message is never lost, never sent twice and never silently part of the history: it is
// shown as a `pending` user turn and stays in the (read-only) composer until the server has
// answered 2xx; a cancel, Stop or final refusal before that removes the turn and leaves the
// text in the composer.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const S = window.TMStore;
  const KEYS = { current: "tokenmill.current", draft: "tokenmill.draft", settings: "tokenmill.settings" };
  const DEFAULTS = { model: "", system: "", temperature: 0.7, topP: 1, maxTokens: 256 };
  // This tab's id (sessionStorage outlives a reload, not the tab): pending turns carry it, so a
  // reload takes back its own unsent message and leaves another tab's waiting one alone.
  const TAB = sessionStorage.getItem("tokenmill.tab") || Math.random().toString(36).slice(2, 10);
  try { sessionStorage.setItem("tokenmill.tab", TAB); } catch (_) { /* unavailable */ }

  const loaded = S.loadAll();
  let conversations = loaded.conversations;
  let currentId = S.get(KEYS.current) || null;
  const settings = Object.assign({}, DEFAULTS, S.getJSON(KEYS.settings, {}));
  let controller = null;    // the AbortController of the send in progress, if any
  let active = null;        // the conversation that send is writing into
  const dirty = new Set(loaded.unsaved);   // ids of conversations changed here, not yet saved
  let saveTimer = null, noticeTimer = null;

  const current = () => conversations.find((c) => c.id === currentId) || null;
  const touch = (conv) => { conv.updated = Math.max(Date.now(), (conv.updated || 0) + 1); dirty.add(conv.id); };

  function saveNow() {
    clearTimeout(saveTimer);
    saveTimer = null;
    const evicted = [];
    for (const id of [...dirty]) {
      dirty.delete(id);
      const conv = conversations.find((c) => c.id === id);
      if (!conv) continue;
      const r = S.save(conv, [currentId, active && active.id].filter(Boolean));
      evicted.push(...r.evicted);
      if (r.stale && conv !== active) conversations[conversations.indexOf(conv)] = r.stale;
      if (r.full) notice("Browser storage is full: this conversation is not saved (it stays until the page is closed).", true);
    }
    if (evicted.length) {
      conversations = conversations.filter((c) => !evicted.includes(c.id));
      notice("Browser storage was full: removed " + (evicted.length === 1 ? "the oldest conversation"
             : "the " + evicted.length + " oldest conversations") + " to make room.", false);
      renderList();
    }
    if (currentId) S.trySet(KEYS.current, currentId);
    else S.remove(KEYS.current);
  }
  // While streaming, a save per token would re-serialize the conversation each time: batch
  // them (a fraction of a second at most can be lost, and pagehide flushes it).
  function saveSoon() { if (!saveTimer) saveTimer = setTimeout(saveNow, 200); }

  function notice(text, isError) {
    const el = $("notice");
    el.textContent = text;
    el.classList.toggle("error", !!isError);
    el.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { el.hidden = true; }, 15000);
  }
  const hideNotice = () => { $("notice").hidden = true; };

  // ---------- rendering ----------

  function renderList() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of [...conversations].sort((a, b) => b.updated - a.updated)) {
      const li = document.createElement("li");
      li.className = "conversation" + (c.id === currentId ? " active" : "");
      li.dataset.id = c.id;
      li.setAttribute("data-testid", "conversation");
      const name = c.title || "New chat";
      const title = document.createElement("button");   // a button: reachable with Tab, Enter opens
      title.type = "button";
      title.className = "title";
      title.textContent = name;
      title.title = c.title || "";
      if (c.id === currentId) title.setAttribute("aria-current", "true");
      title.addEventListener("click", () => openConversation(c.id));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.setAttribute("data-testid", "delete-conversation");
      del.setAttribute("aria-label", "Delete conversation: " + name);
      del.textContent = "×";
      del.addEventListener("click", () => deleteConversation(c.id));
      li.append(title, del);
      list.append(li);
    }
  }

  function messageElement(msg) {
    const el = document.createElement("div");
    el.className = "msg " + msg.role + (msg.pending ? " pending" : "");
    const body = document.createElement("div");
    if (msg.role === "assistant") {
      el.dataset.raw = msg.content;   // the model's text as it came, before markdown
      body.className = "content";
      // Markdown output is built from escaped text only (see markdown.js).
      body.innerHTML = window.renderMarkdown(msg.content);
      el.append(body);
      const notes = [msg.stats, msg.interrupted ? "interrupted" : "", msg.stopped ? "stopped" : "",
                     msg.dropped ? msg.dropped + " oldest messages left out (context limit)" : ""].filter(Boolean);
      if (notes.length) {
        const stats = document.createElement("div");
        stats.className = "reply-stats";
        stats.textContent = notes.join(" · ");
        el.append(stats);
      }
    } else {
      body.className = "text";
      body.textContent = msg.content;   // user text and error messages: never parsed as HTML
      el.append(body);
      if (msg.pending) el.title = "Not sent yet: waiting for the server";
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
    dirty.delete(id);
    S.removeConversation(id);
    saveNow();
    renderList();
    renderMessages();
  }

  // ---------- the composer ----------

  const prompt = $("prompt");
  function setDraft(text) {
    prompt.value = text;
    if (text) S.trySet(KEYS.draft, text); else S.remove(KEYS.draft);
  }
  // The unsent text goes back into the composer (unless it is there already).
  function restoreText(text) {
    if (!prompt.value.includes(text)) setDraft(prompt.value.trim() ? text + "\n\n" + prompt.value : text);
  }
  // Takes a pending turn out of its conversation (and the conversation, if nothing is left).
  function unsend(conv, turn) {
    const i = conv.messages.indexOf(turn);
    if (i >= 0) conv.messages.splice(i, 1);
    if (conv.messages.length) { touch(conv); return; }
    conversations = conversations.filter((c) => c !== conv);
    S.removeConversation(conv.id);
    dirty.delete(conv.id);
    if (currentId === conv.id) currentId = null;
  }

  window.TMChat = { conversations: () => conversations, current, touch, saveNow, saveSoon, notice,
    hideNotice, setBusy, renderList, renderMessages, messageElement, markNewestReply, scrollIfNearBottom,
    restoreText, unsend, setDraft, settings, DEFAULTS, TAB, prompt,
    saveSettings: () => S.trySet(KEYS.settings, JSON.stringify(settings)),
    getController: () => controller, setController: (c, conv) => { controller = c; active = c ? conv : null; },
    newConversation: (title) => {
      const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7),
                     title, messages: [], updated: Date.now() };
      conversations.push(conv);
      currentId = conv.id;
      return conv;
    } };

  function stop() { if (controller) controller.abort(); }

  // ---------- a reload, other tabs ----------

  // A turn still pending when this tab went away (a reload during a capacity or rate-limit
  // wait) was never accepted. It is NOT resent by itself (a reload is often how one gives up
  // on a wait, and a send nobody pressed could land much later): the turn is removed, its text
  // goes back into the composer, and a notice says so. Another tab's pending turn is left
  // alone unless it is over 10 minutes old (a tab that is gone). A reply that was streaming
  // when this tab went away is marked interrupted.
  function recoverAfterReload() {
    let unsent = false;
    for (const conv of [...conversations]) {
      for (const m of [...conv.messages]) {
        if (m.streaming === TAB) { delete m.streaming; m.interrupted = true; touch(conv); }
        if (!m.pending) continue;
        const mine = m.pending === TAB || m.pending === true;
        if (!mine && Date.now() - (m.at || 0) < 10 * 60 * 1000) continue;
        unsend(conv, m);
        if (mine) { restoreText(m.content); unsent = true; }
      }
    }
    if (unsent) notice("Not sent yet: your message is back in the box below. Press Send to send it.", false);
    if (dirty.size) saveNow();
  }

  function onStorage(e) {
    const ch = S.change(e);
    if (!ch) return;
    if (ch.all) {
      const keep = active ? [active] : [];
      conversations = keep.concat(S.loadAll().conversations.filter((c) => !active || c.id !== active.id));
    } else if (!active || ch.id !== active.id) {   // the conversation being written here wins
      const i = conversations.findIndex((c) => c.id === ch.id);
      if (!ch.conv) {
        if (i >= 0) conversations.splice(i, 1);
        if (currentId === ch.id) currentId = null;
      } else if (i < 0) conversations.push(ch.conv);
      else if (!(conversations[i].updated > ch.conv.updated)) { conversations[i] = ch.conv; dirty.delete(ch.id); }
    }
    renderList();
    if (!active || active !== current()) renderMessages();
  }

  // ---------- wiring ----------

  const emptyState = $("empty-state");
  prompt.value = S.get(KEYS.draft) || "";
  prompt.addEventListener("input", () => { if (prompt.value) S.trySet(KEYS.draft, prompt.value); else S.remove(KEYS.draft); });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); window.TMSend.send(); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); window.TMSend.send(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("notice").addEventListener("click", hideNotice);
  window.addEventListener("pagehide", () => { if (saveTimer || dirty.size) saveNow(); });
  window.addEventListener("storage", onStorage);

  recoverAfterReload();
  if (currentId && !current()) currentId = null;
  renderList();
  renderMessages();
  setBusy(false);   // send.js binds the settings and loads the models
})();
