"""Client signatures: what a legitimate client's requests look like (required headers, user-agent
patterns), and whether a request matches; mismatches are logged or blocked."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


def _short(text: str, limit: int = 80) -> str:
    # repr() escapes control characters, so client-supplied text cannot forge log lines.
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass
class SignaturePolicy:
    """What a legitimate client's requests look like (e.g. the official SDK's headers)."""

    required_headers: list[str] = field(default_factory=list)
    user_agent_patterns: list[str] = field(default_factory=list)
    action: str = "log"
    _compiled: list[re.Pattern[str]] = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.action not in ("log", "block"):
            raise ValueError(f"signature policy action must be 'log' or 'block'; got {self.action!r}")
        for name, values in (("required_headers", self.required_headers),
                             ("user_agent_patterns", self.user_agent_patterns)):
            if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"signature policy {name} must be a list of non-empty strings; got {values!r}")
        self.required_headers = [h.strip().lower() for h in self.required_headers]
        self._compiled = []
        for pattern in self.user_agent_patterns:
            try:
                self._compiled.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"signature policy user_agent_patterns: bad regex {pattern!r}: {e}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SignaturePolicy":
        if not isinstance(d, Mapping):
            raise ValueError(f"signature policy must be a JSON object; got {type(d).__name__}")
        unknown = set(d) - {"required_headers", "user_agent_patterns", "action"}
        if unknown:  # a typo here would silently disable the check, so reject it
            raise ValueError(f"signature policy has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    def check(self, headers: Mapping[str, str]) -> Optional[str]:
        """None when the request matches, else a short reason for the log."""
        lower = {k.lower(): v for k, v in headers.items()}
        for name in self.required_headers:
            if name not in lower:
                return f"missing header {name}"
        if self._compiled:
            ua = lower.get("user-agent")
            if ua is None:
                return "missing header user-agent"
            if not any(p.search(ua) for p in self._compiled):
                return f"user-agent {_short(ua)} matches no allowed pattern"
        return None
