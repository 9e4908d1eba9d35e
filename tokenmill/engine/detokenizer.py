"""Incremental detokenization that never emits half a character.

Byte-level tokenizers split multi-byte UTF-8 characters across tokens; decoding a prefix then
yields U+FFFD. We decode a short window (a few tokens of context + the new ones) and hold the new
text back while it ends in U+FFFD, the approach of vLLM's `detokenize_incrementally`. Decoding the
window with its context, and diffing against the context alone, keeps leading spaces that
SentencePiece-style decoders would strip at the start of a string.
"""
from __future__ import annotations

from typing import Any, Optional

# Tokens of context decoded before the new tokens; enough for any merge that spans tokens.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop_strings: Optional[list[str]] = None, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.stop_strings = stop_strings or []
        self.include_stop = include_stop_str_in_output
        # While streaming, this many trailing characters are held back: they might be the start
        # of a stop string that must not reach the user.
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int, check_stop: bool = True) -> Optional[str]:
        """Add one token. Returns the stop string if one now appears in the text, else None."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        if not check_stop:
            return None
        for stop in self.stop_strings:
            idx = self.text.find(stop, start)
            if idx != -1:
                self.text = self.text[: idx + len(stop) if self.include_stop else idx]
                return stop
        return None

    def flush(self) -> None:
        """At the end of generation emit whatever bytes were held back, even if incomplete."""
        new_text = self._decode(self.ids[self.prefix_offset:])
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)

    def visible_len(self, finished: bool) -> int:
        """How much of `text` is safe to show: while running, not a possible stop-string prefix."""
        if finished or self.holdback == 0:
            return len(self.text)
        return max(0, len(self.text) - self.holdback)
