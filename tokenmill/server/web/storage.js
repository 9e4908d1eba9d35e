// The chat page's localStorage: one key per conversation ("tokenmill.conv.<id>"), so two tabs
// never overwrite each other's conversations. A tab writes only the conversations it changed,
// and never over a stored copy with a newer `updated` (a stale copy never wins). There is no
// separate index to keep in step: the conversations are the keys with that prefix.
// Every write is guarded: a full storage (QuotaExceededError) evicts the oldest conversations
// (never the ones asked to keep) and says which; nothing here throws.
(function () {
  "use strict";

  const PREFIX = "tokenmill.conv.";
  const OLD_KEY = "tokenmill.conversations";   // before: the whole array under one key

  const parse = (s) => { try { return s == null ? null : JSON.parse(s); } catch (_) { return null; } };
  const valid = (c) => c && typeof c === "object" && typeof c.id === "string" && Array.isArray(c.messages);
  const isQuota = (e) => e && (e.name === "QuotaExceededError" || e.name === "NS_ERROR_DOM_QUOTA_REACHED" ||
                               e.code === 22 || e.code === 1014);

  function get(key) { try { return localStorage.getItem(key); } catch (_) { return null; } }
  function remove(key) { try { localStorage.removeItem(key); } catch (_) { /* nothing to do */ } }

  // setItem that reports instead of throwing: "ok", "quota" or "error".
  function trySet(key, value) {
    try { localStorage.setItem(key, value); return "ok"; }
    catch (e) { return isQuota(e) ? "quota" : "error"; }
  }

  function storedIds() {
    const ids = [];
    for (let i = 0; i < localStorage.length; i++) {
      const k = localStorage.key(i);
      if (k && k.startsWith(PREFIX)) ids.push(k.slice(PREFIX.length));
    }
    return ids;
  }

  function read(id) {
    const c = parse(get(PREFIX + id));
    return valid(c) && c.id === id ? c : null;
  }

  // Every stored conversation. The old single-array key is split into per-conversation keys
  // (one that does not fit is returned anyway, so the caller keeps it and saves it later).
  function loadAll() {
    const byId = new Map();
    for (const id of storedIds()) { const c = read(id); if (c) byId.set(id, c); }
    const old = parse(get(OLD_KEY));
    const unsaved = [];
    if (get(OLD_KEY) != null) {
      remove(OLD_KEY);   // removed first: its copies would not fit next to it in a full storage
      for (const c of Array.isArray(old) ? old : []) {
        if (!valid(c) || (byId.has(c.id) && byId.get(c.id).updated >= c.updated)) continue;
        byId.set(c.id, c);
        if (trySet(PREFIX + c.id, JSON.stringify(c)) !== "ok") unsaved.push(c.id);
      }
    }
    return { conversations: [...byId.values()], unsaved };
  }

  // Store `conv` unless the stored copy is newer. When storage is full, the oldest stored
  // conversations not in `keep` are evicted one by one until it fits.
  // Returns { ok, stale (the newer stored copy, if any), evicted: [ids] }.
  function save(conv, keep) {
    const evicted = [];
    const stored = read(conv.id);
    if (stored && stored.updated > conv.updated) return { ok: false, stale: stored, evicted };
    const json = JSON.stringify(conv);
    for (;;) {
      const r = trySet(PREFIX + conv.id, json);
      if (r === "ok") return { ok: true, evicted };
      if (r !== "quota") return { ok: false, evicted };
      const victims = storedIds().filter((id) => id !== conv.id && !keep.includes(id))
        .map((id) => ({ id, updated: (read(id) || { updated: 0 }).updated || 0 }))
        .sort((a, b) => a.updated - b.updated);
      if (!victims.length) return { ok: false, full: true, evicted };
      remove(PREFIX + victims[0].id);
      evicted.push(victims[0].id);
    }
  }

  // A `storage` event about a conversation: { id, conv } (conv null: deleted there), or
  // { all: true } when the whole storage was cleared, or null for any other key.
  function change(e) {
    if (e.key === null) return { all: true };
    if (!e.key.startsWith(PREFIX)) return null;
    const id = e.key.slice(PREFIX.length);
    const conv = parse(e.newValue);
    return { id, conv: valid(conv) && conv.id === id ? conv : null };
  }

  window.TMStore = {
    loadAll, save, change, get, trySet,
    removeConversation: (id) => remove(PREFIX + id),
    getJSON: (key, fallback) => { const v = parse(get(key)); return v == null ? fallback : v; },
    remove,
  };
})();
