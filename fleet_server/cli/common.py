"""Helpers every `fleetctl` sub-command shares: the server options, ``--json``, printing results and
JSON output, help with examples."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["ExamplesHelpFormatter", "add_json_option", "emit", "json_requested", "page_offset",
           "positive_seconds", "print_json", "server_options"]

_MAX_HTTP_TIMEOUT = 86400.0


def page_offset(text: str) -> int:
    """Parse ``--offset``: how many entries of a paged listing to skip, a whole number from 0.

    Raises:
        argparse.ArgumentTypeError: not a whole number, or out of range.
    """
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from exc
    if not 0 <= value <= 10**9:
        raise argparse.ArgumentTypeError("must be a whole number from 0")
    return value


def positive_seconds(text: str) -> float:
    """Parse ``--http-timeout``: a positive, finite number of seconds (at most a day), for argparse.

    Raises:
        argparse.ArgumentTypeError: anything else, with a one-line reason.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= _MAX_HTTP_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds (at most {int(_MAX_HTTP_TIMEOUT)}), got {text[:40]!r}")
    return value


def server_options(role: str = "read", *, legacy_timeout: bool = False) -> argparse.ArgumentParser:
    """Return the parent parser of every command that calls the fleet server: ``--server``,
    ``--context``, ``--token-file`` and ``--http-timeout`` (plus ``--timeout``, its deprecated
    spelling, where ``--timeout`` used to be the HTTP timeout)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("fleet server (option, else environment, else config file)")
    group.add_argument("--server", metavar="URL",
                       help="fleet server base URL (default: $FLEET_SERVER, else the context's server, "
                            "else http://127.0.0.1:8080)")
    group.add_argument("--context", metavar="NAME",
                       help="the context of $XDG_CONFIG_HOME/edge-fleet/fleetctl.yaml to use "
                            "(default: $FLEET_CONTEXT, else the file's current one)")
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help=f"file holding the API {role} token (default: $FLEET_TOKEN, else the "
                            "context's token)")
    group.add_argument("--http-timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                       help="seconds to wait for each answer of the server (default: 10)")
    if legacy_timeout:
        group.add_argument("--timeout", dest="http_timeout", type=positive_seconds, default=argparse.SUPPRESS,
                           metavar="SECONDS", help="deprecated spelling of --http-timeout")
    return parent


def add_json_option(parser: argparse.ArgumentParser, text: str = "print JSON instead of text") -> None:
    """Add ``--json`` and its alias ``-o json`` / ``--output json`` (``-o text`` is the default)."""
    parser.add_argument("--json", action="store_true", help=text)
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="output format: -o json is --json (default: text)")


def json_requested(args: argparse.Namespace) -> bool:
    """True when ``--json`` or ``-o json`` was given."""
    return bool(getattr(args, "json", False)) or getattr(args, "output", "text") == "json"


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
