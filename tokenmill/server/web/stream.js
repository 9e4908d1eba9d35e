// What the chat page sends and how it reads the answer: the request's messages (trimmed to the
// model's context), the SSE stream of POST /v1/chat/completions, and a reply's stats line.
(function () {
  "use strict";

  // The page has no tokenizer, so the size of a message is an ESTIMATE: characters / 3 plus a
  // few tokens for the chat template around it (real text runs nearer 4 characters a token, so
  // this errs on the side of leaving room). Exact limits are the server's: a prompt that still
  // does not fit comes back as a 400 "context_length_exceeded", shown with a hint.
  // A reply whose completion token count is known (from usage) counts that instead.
  const estimate = (text) => Math.ceil(String(text).length / 3) + 8;
  const size = (m) => (m.tokens > 0 ? m.tokens + 8 : estimate(m.content));

  // The history goes with every request (system prompt first), so the server's prefix cache
  // can serve the earlier turns. Error lines are shown, never sent; a turn still waiting to be
  // accepted is sent only by the request carrying it (`sending`). When the history would not
  // leave room for maxTokens in maxModelLen, the oldest user/assistant turns are left out (the
  // system prompt and the newest turn always go). Returns { messages, dropped }.
  function requestMessages(conv, { system, sending, maxModelLen, maxTokens }) {
    const turns = conv.messages.filter((m) => m === sending || (!m.pending &&
      (m.role === "user" || (m.role === "assistant" && m.content))));
    const head = system && system.trim() ? [{ role: "system", content: system }] : [];
    let start = 0;
    if (maxModelLen > 0) {
      const budget = maxModelLen - maxTokens - head.reduce((a, m) => a + estimate(m.content), 0) - 8;
      let total = turns.reduce((a, m) => a + size(m), 0);
      const drop = () => { total -= size(turns[start]); start += 1; };
      while (total > budget && start < turns.length - 1) drop();
      while (start < turns.length - 1 && turns[start].role !== "user") drop();   // begin with a user turn
    }
    return { messages: head.concat(turns.slice(start).map((m) => ({ role: m.role, content: m.content }))),
             dropped: start };
  }

  // Reads the SSE body, calling onDelta(text) per content delta. Resolves with
  // { complete, usage }: complete is false when the stream closed without "data: [DONE]"
  // (the reply was cut off). A streamed error chunk (OpenAI's shape) throws an ApiError.
  async function readStream(res, onDelta) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", usage = null;
    const handle = (raw) => {   // true on [DONE]
      const line = raw.trim();
      if (!line.startsWith("data:")) return false;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return true;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        const err = chunk.error;
        throw new window.TM.ApiError(err.message || String(err), 500, err.code);
      }
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) onDelta(delta.content);
      return false;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();   // an incomplete line waits for the next read
      for (const line of lines) {
        if (handle(line)) { reader.cancel().catch(() => {}); return { complete: true, usage }; }
      }
    }
    // The stream ended: a last line without its newline is still a line (a cut-off one that
    // does not parse is dropped; the reply is marked interrupted either way).
    buffer += decoder.decode();
    let complete = false;
    try { complete = handle(buffer); }
    catch (e) { if (!(e instanceof SyntaxError)) throw e; }
    return { complete, usage };
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

  window.TMStream = { requestMessages, readStream, replyStats, estimate };
})();
