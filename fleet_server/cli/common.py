"""Helpers every `fleetctl` sub-command shares: printing results and JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["emit", "print_json"]


def print_json(obj: Any) -> None:
    """Print ``obj`` as one pretty JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def emit(obj: dict[str, Any], text: str, *, as_json: bool) -> None:
    """Print ``obj`` as JSON when ``as_json`` is set, else the human ``text``."""
    if as_json:
        print_json(obj)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
