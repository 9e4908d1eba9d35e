"""Logging set-up for every command: one handler on stderr, plain text or one JSON object per line
(`--log-format json`, for log shippers). uvicorn's loggers and the model workers of a parallel
engine go through the same handler and format.

A record's `extra` fields (the access log's request id, key id, tokens...) become keys of its JSON
object; in text they are left to the message, which already says them. An extra `_json_message`
replaces the message in JSON (the access log's, whose text message lists the fields again).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, Optional

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has; the others came in through `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# uvicorn's colourised copy of its message: noise in a JSON line.
_DROPPED = {"color_message"}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...extra fields, "exc_info"?}`, one line per record."""

    def __init__(self, static: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.static = static or {}  # fields every line carries (a worker's rank)

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        out: dict[str, Any] = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                               "level": record.levelname, "logger": record.name,
                               "message": getattr(record, "_json_message", None) or record.getMessage(),
                               **self.static}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _DROPPED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def resolve(level: Optional[str], fmt: Optional[str], default_level: str = "WARNING") -> tuple[str, str]:
    """The level and format to use: the flag, else $TOKENMILL_LOG_LEVEL / $TOKENMILL_LOG_FORMAT,
    else the command's default. Raises ValueError naming a bad value."""
    level = (level or os.environ.get("TOKENMILL_LOG_LEVEL") or default_level).upper()
    fmt = (fmt or os.environ.get("TOKENMILL_LOG_FORMAT") or "text").lower()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"log level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got {level!r}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}; got {fmt!r}")
    return level, fmt


def configure_logging(level: str, fmt: str = "text", rank: Optional[int] = None) -> None:
    """One stderr handler on the root logger (replacing the one an earlier call put there; others,
    such as pytest's, stay); uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler._tokenmill = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter({"rank": rank} if rank is not None else None))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT if rank is None else
                                               TEXT_FORMAT.replace("%(levelname)s", f"rank{rank} %(levelname)s")))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_tokenmill", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)
