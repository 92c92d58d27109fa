"""Text for one-line reasons: what a log line or an error message quotes from an exception or a
peer, flattened and bounded."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
