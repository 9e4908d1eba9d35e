// A small, safe markdown renderer for model replies.
//
// Safety rule: every piece of model text is HTML-escaped BEFORE any markup is added, and the
// only markup added is a fixed set of tags built here (no attributes taken from the text except
// an http(s) link target, which is escaped too). So `<script>` or `<img onerror=...>` in a reply
// always shows up as literal text.
//
// Supported: fenced code blocks (```lang), inline `code`, **bold**, *italic* / _italic_,
// # headings, - / * / + bullet lists, 1. numbered lists, paragraphs and line breaks,
// [text](http(s)://url) links.
(function () {
  "use strict";

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Bold and italic over escaped text (no markup in it but placeholders).
  function emphasis(s) {
    s = s.replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^\w])__(?=\S)([^_]*?\S)__(?!\w)/g, "$1<strong>$2</strong>");
    s = s.replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\*)/g, "$1<em>$2</em>");
    return s.replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
  }

  // Inline markup over an ESCAPED line. Code spans, then links, are cut out first (into
  // placeholders made of \u0000, which cannot occur in the text: renderMarkdown strips it) so
  // nothing inside them, nor in a link's generated markup (href, target), is turned into
  // bold/italic. A link's text gets its own emphasis. Placeholders are restored last.
  function inline(escaped) {
    const slots = [];
    const hold = (html) => { slots.push(html); return "\u0000" + (slots.length - 1) + "\u0000"; };
    let s = escaped.replace(/`([^`]+)`/g, (_, code) => hold("<code>" + code + "</code>"));
    // Links: the target must be http(s); it is already escaped, so it cannot close the attribute.
    s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, text, url) =>
      hold('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + emphasis(text) + "</a>"));
    const restore = (t) => t.replace(/\u0000(\d+)\u0000/g, (_, i) => restore(slots[Number(i)]));
    return restore(emphasis(s));
  }

  const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*(\d+)[.)]\s+(.*)$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;

  function renderMarkdown(text) {
    const lines = String(text).replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    const flush = () => {
      if (para.length) out.push("<p>" + para.map((l) => inline(escapeHtml(l))).join("<br>") + "</p>");
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flush();
        const body = [];
        // An unclosed fence (reply cut off mid-block) runs to the end of the text.
        for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
        const cls = m[1] ? ' class="language-' + escapeHtml(m[1]) + '"' : "";
        out.push("<pre><code" + cls + ">" + escapeHtml(body.join("\n")) + "</code></pre>");
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        flush();
        const ordered = !BULLET.test(line);
        const re = ordered ? NUMBERED : BULLET;
        // An ordered list starts at its first number (<ol start>), so a list broken by a code
        // block goes on counting where it was.
        const first = ordered ? parseInt(re.exec(line)[1], 10) : 1;
        const items = [];
        for (; i < lines.length; i++) {
          if ((m = re.exec(lines[i]))) { items.push("<li>" + inline(escapeHtml(m[m.length - 1])) + "</li>"); continue; }
          // Blank lines between two items keep the list going (a "loose" list).
          let j = i;
          while (j < lines.length && !lines[j].trim()) j++;
          if (j === i || j === lines.length || !re.test(lines[j])) break;
          i = j - 1;
        }
        i--;
        const open = ordered ? (first !== 1 ? '<ol start="' + first + '">' : "<ol>") : "<ul>";
        out.push(open + items.join("") + (ordered ? "</ol>" : "</ul>"));
      } else if ((m = HEADING.exec(line))) {
        flush();
        // Replies are not documents: headings start at h3 so they do not shout.
        const level = Math.min(6, m[1].length + 2);
        out.push("<h" + level + ">" + inline(escapeHtml(m[2])) + "</h" + level + ">");
      } else if (!line.trim()) {
        flush();
      } else {
        para.push(line);
      }
    }
    flush();
    return out.join("");
  }

  window.escapeHtml = escapeHtml;
  window.renderMarkdown = renderMarkdown;
})();
