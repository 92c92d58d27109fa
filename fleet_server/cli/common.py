"""Helpers every `fleetctl` sub-command shares: printing results and JSON output, help with examples."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["ExamplesHelpFormatter", "emit", "print_json"]


class ExamplesHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help whose examples epilog (text starting ``examples:``) is printed exactly as written.

    The description is wrapped to the terminal as argparse usually does.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def print_json(obj: Any) -> None:
    """Print ``obj`` as one pretty JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def emit(obj: dict[str, Any], text: str, *, as_json: bool) -> None:
    """Print ``obj`` as JSON when ``as_json`` is set, else the human ``text``."""
    if as_json:
        print_json(obj)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
