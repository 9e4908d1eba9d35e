"""The text a request is routed by, and the text it leaves cached once answered.

A chat request's text is the JSON-canonical rendering of each message in order, so turn k's
text starts with turn k-1's (its messages plus the reply the client sends back as an assistant
message): the same prefix the replica's chat template gives its KV cache.
"""
from __future__ import annotations

import json
from typing import Any, Optional

CHAT_PATH = "/v1/chat/completions"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _message(message: Any) -> str:
    return _canonical(message) + "\n"


def request_text(path: str, body: dict[str, Any]) -> str:
    """The routing text of an OpenAI request body (the model first: models share no cache;
    tools next: chat templates render them ahead of the messages)."""
    head = f"{body.get('model', '')}\n"
    if path == CHAT_PATH:
        tools = body.get("tools")
        messages = body.get("messages")
        parts = [head, _message(tools) if tools else ""]
        if isinstance(messages, list):
            parts.extend(_message(m) for m in messages)
        return "".join(parts)
    prompt = body.get("prompt")
    return head + (prompt if isinstance(prompt, str) else _canonical(prompt))


def answered_text(path: str, body: dict[str, Any], prompt: str, reply: Optional[str]) -> Optional[str]:
    """The routing text of the conversation once `reply` is added: what a follow-up request
    starts with. None when no follow-up can extend it (no reply, or a prompt of token ids)."""
    if not reply:
        return None
    if path == CHAT_PATH:
        return prompt + _message({"role": "assistant", "content": reply})
    return prompt + reply if isinstance(body.get("prompt"), str) else None


class ReplyCollector:
    """Gathers the first choice's text from a JSON reply or from SSE events as they pass."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.done = False  # the stream's `data: [DONE]` has passed
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _choice(self, payload: Any, key: str) -> None:
        if not isinstance(payload, dict):
            return
        for choice in payload.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                part = choice.get(key)
                if isinstance(part, dict):  # a chat message or delta
                    part = part.get("content")
                if isinstance(part, str):
                    self._parts.append(part)

    def feed_json(self, payload: Any) -> None:
        self._choice(payload, "message" if self.chat else "text")

    def feed_event(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                payload = json.loads(data)
            except ValueError:
                continue
            self._choice(payload, "delta" if self.chat else "text")
