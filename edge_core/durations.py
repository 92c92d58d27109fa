"""Durations as people write them in YAML and on command lines: one parser for every caller.

Accepted: a number of seconds (``30``, ``0.25``) or text made of parts with units, largest first:
``250ms``, ``30s``, ``5m``, ``1h30m``, ``2d``, ``2w``. Callers add their own bounds and error types.

Command lines use :func:`parse_cli_seconds`, which refuses a bare number: ``--expires 3`` is far
more likely to mean three days than three seconds. Config files keep :func:`parse_seconds`.
"""

from __future__ import annotations

import math
import re

__all__ = ["CLI_EXAMPLES", "parse_cli_seconds", "parse_seconds"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|w|d|h|m|s)")
_UNITS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ORDER = ["w", "d", "h", "m", "s", "ms"]
_BARE = re.compile(r"\d+(?:\.\d+)?")
CLI_EXAMPLES = "90m, 12h, 3d or 2w"
"""The examples a command-line duration error names."""


def parse_seconds(value: object) -> float:
    """Return ``value`` as seconds (not negative).

    Raises:
        ValueError: not a number or a duration text such as ``30s``, ``5m``, ``1h30m``; the message
            is a short reason.
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite number of seconds, not negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    text = value.strip()
    if _BARE.fullmatch(text):
        return float(text)
    pos, total, last = 0, 0.0, -1
    for m in _PART.finditer(text):
        rank = _ORDER.index(m.group(2))
        if m.start() != pos or rank <= last:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos, last = m.end(), rank
    if pos == 0 or pos != len(text):
        raise ValueError(f"must be a duration such as 30s, 5m or 1h, got {text[:40]!r}")
    return total


def parse_cli_seconds(text: str) -> float:
    """Return a command-line duration such as ``90m``, ``12h``, ``3d`` or ``2w`` as seconds.

    Raises:
        ValueError: a bare number (no unit) or text that is not a duration; the message is one
            short sentence naming the text, for the caller to prefix with the option name.
    """
    shown = text.strip()[:40]
    if _BARE.fullmatch(text.strip()):
        raise ValueError(f"{shown!r} has no unit: use a number with a unit, such as {CLI_EXAMPLES} "
                         f"({shown}s if you mean seconds)")
    try:
        return parse_seconds(text)
    except ValueError:
        raise ValueError(f"{shown!r} is not a duration: use a number with a unit, such as "
                         f"{CLI_EXAMPLES}") from None
