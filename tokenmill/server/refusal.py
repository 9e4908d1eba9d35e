"""A request turned away before it reaches the engine, and why; the HTTP layer answers it with
one error response (server/errors.py builds the body)."""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.server.errors import ERROR_TYPES, error_body

REASONS = ("auth", "rate_limit", "signature", "capacity", "bad_request", "shutting_down")


class Refusal(Exception):
    """A request turned away before it reaches the engine; maps onto one HTTP error response."""

    def __init__(self, status: int, reason: str, message: str, code: str,
                 err_type: Optional[str] = None, retry_after: Optional[float] = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"Refusal reason must be one of {', '.join(REASONS)}; got {reason!r}")
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.code = code
        self.err_type = err_type or ERROR_TYPES.get(status, "server_error")
        self.retry_after = retry_after

    def to_openai_body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.err_type, code=self.code)
