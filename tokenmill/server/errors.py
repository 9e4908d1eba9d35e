"""The OpenAI error body, built in this one place, and its schema for the OpenAPI document.

Every error the server answers with, whatever refused the request (validation, access control,
admission, the engine), has this body: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel

# The OpenAI error type of each status tokenmill answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 499: "invalid_request_error",
               503: "service_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class KServeErrorResponse(BaseModel):
    """The error body of Triton's protocol (the /v2 routes)."""

    error: str


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable", "shutting_down"]


def error_body(message: str, status: int = 400, err_type: Optional[str] = None, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """The body of an error answered with `status` (its type follows from the status unless given)."""
    return {"error": {"message": message, "type": err_type or ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


_DESCRIPTIONS = {
    400: "The request is malformed or cannot be served (the message and param say what is wrong).",
    401: "Missing, malformed or unknown API key.",
    403: "The request does not match the required client signature.",
    404: "The model (or model version) named in the request is not served here.",
    429: "A rate limit or quota of this API key is spent; Retry-After says when to come back.",
    503: "The server is at capacity, shutting down, or the model or engine is not ready; Retry-After says "
         "when to retry.",
}


def error_responses(*statuses: int, body: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses, each with the error body's schema (OpenAI's by
    default; KServeErrorResponse for the /v2 routes)."""
    return {s: {"model": body, "description": _DESCRIPTIONS[s]} for s in statuses}
