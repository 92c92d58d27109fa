"""Structured logs: one JSON object a line, carrying the device, commit and release being handled.

Entry points call :func:`setup_logging` once. Code that works on a device, commit or release wraps
the work in :func:`log_context`; every record logged inside carries those fields. Messages are
formatted with their lazy ``%s`` arguments; callers never pass secret plaintext to a logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "current_context", "log_context", "release_words",
           "setup_logging"]

CONTEXT_FIELDS = ("device", "commit", "release")
_context: ContextVar[dict[str, Any] | None] = ContextVar("edge_agent_log_context", default=None)


def release_words(version: int | None, commit: str | None) -> str:
    """Name a release for a log line or a printed result: ``release 3 commit 9f2c...``, ``commit
    9f2c...`` (not verified yet), or ``no release`` (nothing fetched), never ``release None``."""
    words = ([f"release {version}"] if version is not None else []) + \
        ([f"commit {commit}"] if commit else [])
    return " ".join(words) or "no release"


def current_context() -> dict[str, Any]:
    """Return a copy of the fields the current context adds to every log record."""
    return dict(_context.get() or {})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (device=, commit=, release=, ...) to every record logged inside the block.

    ``None`` values are left out; nested blocks add to (and may override) the outer fields.
    """
    merged = current_context()
    merged.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(current_context())
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def setup_logging(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) as JSON lines; return the handler.

    Replaces handlers that an earlier call installed, so calling it twice does not double lines.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edge_agent", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._edge_agent = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
