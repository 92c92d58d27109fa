"""`fleetctl notifications list`: the fleet server's webhook delivery log (``GET
/api/v1/notifications``), newest first, with the same server options, token, timeout and errors as
`fleetctl devices`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.cli.common import (
    ExamplesHelpFormatter,
    add_json_option,
    page_offset,
    print_json,
    server_options,
)
from fleet_server.cli.devices import api_get, client_of, format_time, page_limit
from fleet_server.errors import ApiError

__all__ = ["format_notifications", "register"]

_PATH = "/api/v1/notifications"
_EXAMPLES = """examples:
  fleetctl notifications list
  fleetctl notifications list --state failed
  fleetctl notifications list --limit 20 --offset 20 --json
"""


def _cell(value: object, limit: int = 80) -> str:
    text = " ".join(str(value).split()) if value not in (None, "") else "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_notifications(rows: Sequence[Mapping[str, Any]], total: int, offset: int) -> str:
    """Return deliveries (newest first) as a text table with a closing count line."""
    table: list[tuple[str, ...]] = [("CREATED", "RECEIVER", "EVENT", "STATE", "ATTEMPTS", "LAST", "STATUS",
                                     "ERROR", "EVENT ID")]
    for r in rows:
        table.append((format_time(r.get("created")), _cell(r.get("receiver"), 40), _cell(r.get("event"), 40),
                      _cell(r.get("state")), _cell(r.get("attempts")), format_time(r.get("last_attempt")),
                      _cell(r.get("last_status")), _cell(r.get("last_error")), _cell(r.get("event_id"))))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in table]
    shown = f"{offset + 1}-{offset + len(rows)}" if rows else "none"
    lines.append(f"{shown} of {total} notification(s)")
    return "\n".join(lines) + "\n"


def _run_list(args: argparse.Namespace) -> int:
    client = client_of(args)
    query = [("limit", str(args.limit)), ("offset", str(args.offset))]
    if args.state is not None:
        query.append(("state", args.state))
    answer = api_get(client.server, _PATH, query, token=client.token, timeout=args.http_timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("notifications"), list) \
            or not isinstance(answer.get("total"), int) \
            or not all(isinstance(item, dict) for item in answer["notifications"]):
        raise ApiError(f"fleet server answered an unexpected document for {_PATH}")
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(format_notifications(answer["notifications"], answer["total"], args.offset))
    return 0



def register(subparsers: Any) -> None:
    """Add the ``notifications`` sub-command with its ``list`` action."""
    group = subparsers.add_parser(
        "notifications", help="the fleet server's webhook deliveries",
        description="Webhook notifications the fleet server sent or is still sending.",
        epilog=_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", help="list webhook deliveries, newest first",
        description="List webhook deliveries, newest first: receiver, event, state (pending, delivered, "
                    "failed), attempts and the outcome of the latest attempt.",
        epilog=_EXAMPLES, formatter_class=ExamplesHelpFormatter, parents=[server_options()])
    add_json_option(listing, "print the server's JSON answer")
    listing.add_argument("--state", choices=("pending", "delivered", "failed"), default=None,
                         help="only deliveries in this state")
    listing.add_argument("--limit", type=page_limit, default=100,
                         help="at most this many deliveries, 1 to 1000 (default: 100)")
    listing.add_argument("--offset", type=page_offset, default=0, help="skip this many first (default: 0)")
    listing.set_defaults(func=_run_list)
