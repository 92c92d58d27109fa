"""`fleetctl release list|show N` and `fleetctl audit`: what the fleet server recorded.

Both read the server's API (``GET /api/v1/releases``, ``/api/v1/summary``, ``/api/v1/audit``) with
the same options, token, timeout and errors as `fleetctl devices`. The API returns the newest
entries first, at most 1,000 per call, with no offset: ``--limit`` is the only paging there is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, print_json, server_options
from fleet_server.cli.devices import api_get, client_of, format_time, page_limit
from fleet_server.errors import ApiError, UsageError

__all__ = ["add_release_history", "format_audit", "format_release", "format_releases", "register"]

_MAX_PAGE = 1000
_DETAIL_CHARS = 200

_LIST_EXAMPLES = """examples:
  fleetctl release list
  fleetctl release list --limit 5 --server http://fleet.example:8080 --token-file read.token
  fleetctl release list --json
"""
_SHOW_EXAMPLES = """examples:
  fleetctl release show 12
  fleetctl release show 12 --json
"""
_AUDIT_EXAMPLES = """examples:
  fleetctl audit                       # the newest 100 entries
  fleetctl audit --limit 1000 --json
  fleetctl audit --server http://fleet.example:8080 --token-file read.token
"""


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _signers(value: object) -> str:
    if isinstance(value, list) and value:
        return ",".join(str(s) for s in value)
    return "-"


def _one_line(value: object, limit: int) -> str:
    text = " ".join(str(value).split()) if value not in (None, "") else "-"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_releases(releases: Sequence[Mapping[str, Any]], limit: int,
                    refused: Sequence[Mapping[str, Any]] = ()) -> str:
    """Return the recorded releases (newest first) as a text table with a closing count line, then
    the head commits the Git watcher refused (newest first), when there are any."""
    rows: list[tuple[str, ...]] = [("RELEASE", "COMMIT", "COMMITTED", "RECORDED", "SIGNERS")]
    for r in releases:
        commit = r.get("commit")
        rows.append((str(r.get("version", "-")), commit[:12] if isinstance(commit, str) else "-",
                     format_time(r.get("committed_at")), format_time(r.get("seen_at")),
                     _signers(r.get("signers"))))
    lines = _table(rows)
    count = f"{len(releases)} release(s)"
    lines.append(count + (f": the newest {limit}; --limit up to {_MAX_PAGE} shows more"
                          if len(releases) >= limit and limit < _MAX_PAGE else ""))
    if refused:
        lines.append("")
        lines.extend(_table([("REFUSED", "COMMIT", "RELEASE", "CODE", "REASON")] + [
            (format_time(r.get("at")), str(r.get("commit") or "-")[:12],
             "-" if r.get("release") is None else str(r.get("release")), _one_line(r.get("code"), 40),
             _one_line(r.get("reason"), 100)) for r in refused]))
        lines.append(f"{len(refused)} refused head commit(s): the mirror's branch head was not recorded")
    return "\n".join(lines) + "\n"


def format_release(release: Mapping[str, Any], devices: int | None) -> str:
    """Return one recorded release, with how many devices report it when that is known, as text."""
    lines = [
        f"release:     {release.get('version', '-')}",
        f"commit:      {release.get('commit') or '-'}",
        f"committed:   {format_time(release.get('committed_at'))}",
        f"recorded:    {format_time(release.get('seen_at'))}",
        f"signers:     {_signers(release.get('signers'))}",
        f"devices:     {'-' if devices is None else devices} (reporting this release now)",
    ]
    return "\n".join(lines) + "\n"


def format_audit(entries: Sequence[Mapping[str, Any]], limit: int) -> str:
    """Return audit entries (newest first) as a text table with a closing count line."""
    rows: list[tuple[str, ...]] = [("AT", "ACTOR", "ACTION", "TARGET", "REASON", "DETAIL")]
    for e in entries:
        detail = e.get("detail")
        shown = json.dumps(detail, sort_keys=True, separators=(",", ":")) if detail else "-"
        rows.append((format_time(e.get("at")), _one_line(e.get("actor"), 40), _one_line(e.get("action"), 40),
                     _one_line(e.get("target"), 60), _one_line(e.get("reason"), 80),
                     _one_line(shown, _DETAIL_CHARS)))
    lines = _table(rows)
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    lines.append(count + (f": the newest {limit}; --limit up to {_MAX_PAGE} shows more"
                          if len(entries) >= limit and limit < _MAX_PAGE else ""))
    return "\n".join(lines) + "\n"


def _listing(answer: object, key: str, path: str) -> list[dict[str, Any]]:
    if not isinstance(answer, dict) or not isinstance(answer.get(key), list) \
            or not all(isinstance(item, dict) for item in answer[key]):
        raise ApiError(f"fleet server answered an unexpected document for {path}")
    return list(answer[key])


def _run_list(args: argparse.Namespace) -> int:
    client = client_of(args)
    answer = api_get(client.server, "/api/v1/releases", [("limit", str(args.limit))], token=client.token,
                     timeout=args.http_timeout)
    releases = _listing(answer, "releases", "/api/v1/releases")
    if args.json:
        print_json(answer)
    else:
        refused = answer.get("refused") if isinstance(answer, dict) else None
        shown = [r for r in refused if isinstance(r, dict)] if isinstance(refused, list) else []
        sys.stdout.write(format_releases(releases, args.limit, shown))
    return 0


def _devices_on(summary: object, version: int) -> int | None:
    if not isinstance(summary, dict) or not isinstance(summary.get("releases"), list):
        return None
    for row in summary["releases"]:
        if isinstance(row, dict) and row.get("release") == version and isinstance(row.get("devices"), int):
            return int(row["devices"])
    return 0


def _run_show(args: argparse.Namespace) -> int:
    client = client_of(args)
    server, token = client.server, client.token
    answer = api_get(server, "/api/v1/releases", [("limit", str(_MAX_PAGE))], token=token,
                     timeout=args.http_timeout)
    releases = _listing(answer, "releases", "/api/v1/releases")
    found = [r for r in releases if r.get("version") == args.version]
    if not found:
        newest = releases[0].get("version") if releases else None
        if len(releases) >= _MAX_PAGE:
            raise UsageError(f"release {args.version} is not among the newest {_MAX_PAGE} the fleet server "
                             "recorded (the API shows no older ones)")
        raise UsageError(f"the fleet server recorded no release {args.version}"
                         + (f" (newest: {newest}; see 'fleetctl release list')" if newest is not None
                            else " (it has recorded none yet)"))
    summary = api_get(server, "/api/v1/summary", token=token, timeout=args.http_timeout)
    devices = _devices_on(summary, args.version)
    if args.json:
        print_json({"release": found[0], "devices": devices})
    else:
        sys.stdout.write(format_release(found[0], devices))
    return 0


def _run_audit(args: argparse.Namespace) -> int:
    client = client_of(args)
    answer = api_get(client.server, "/api/v1/audit", [("limit", str(args.limit))], token=client.token,
                     timeout=args.http_timeout)
    entries = _listing(answer, "audit", "/api/v1/audit")
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(format_audit(entries, args.limit))
    return 0


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a release number: {text[:40]!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("a release number is 1 or more")
    return value


def add_release_history(actions: Any) -> None:
    """Add ``list`` and ``show N`` to the ``fleetctl release`` actions."""
    listing = actions.add_parser(
        "list", help="list the signed releases the fleet server recorded, newest first",
        description="List the signed releases the fleet server's Git watcher verified and recorded, "
                    "newest first, then the head commits it refused (a bad signature, a rollback, a "
                    "replayed tree), newest first.",
        epilog=_LIST_EXAMPLES, formatter_class=ExamplesHelpFormatter,
        parents=[server_options(legacy_timeout=True)])
    add_json_option(listing, "print the server's JSON answer")
    listing.add_argument("--limit", type=page_limit, default=50,
                         help="at most this many releases, 1 to 1000 (default: 50)")
    listing.set_defaults(func=_run_list)

    show = actions.add_parser(
        "show", help="show one release the fleet server recorded",
        description="Show one recorded release: its commit, when it was committed and recorded, its "
                    "signers and how many devices report it now. Only the newest 1,000 releases "
                    "can be shown (the API has no older page).",
        epilog=_SHOW_EXAMPLES, formatter_class=ExamplesHelpFormatter,
        parents=[server_options(legacy_timeout=True)])
    show.add_argument("version", type=_version, metavar="N", help="the release number")
    add_json_option(show, "print the server's JSON answer")
    show.set_defaults(func=_run_show)


def register(subparsers: Any) -> None:
    """Add the ``audit`` sub-command."""
    audit = subparsers.add_parser(
        "audit", help="show the fleet server's audit log, newest first",
        description="Show the fleet server's audit log, newest first: who did what to which target "
                    "and why (rollout actions, enrolments, webhook and admin Git polls).",
        epilog=_AUDIT_EXAMPLES, formatter_class=ExamplesHelpFormatter,
        parents=[server_options(legacy_timeout=True)])
    add_json_option(audit, "print the server's JSON answer")
    audit.add_argument("--limit", type=page_limit, default=100,
                       help="at most this many entries, 1 to 1000 (default: 100)")
    audit.set_defaults(func=_run_audit)
