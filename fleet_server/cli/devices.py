"""`fleetctl devices`, `fleetctl device ID` and `fleetctl enroll ID`: the fleet server's device registry.

The server and token come from the options, the environment or the config file, as
:mod:`fleet_server.cli.credentials` says (the read token when the server requires one, the admin
token for ``enroll``). The
HTTP client is the standard library's ``urllib`` (fleetctl stays light); every failure leaves as
one-line :class:`ApiError`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from fleet_server.cli.common import (
    ExamplesHelpFormatter,
    add_json_option,
    page_offset,
    positive_seconds,
    print_json,
    server_options,
)
from fleet_server.cli.credentials import DEFAULT_SERVER, Client, read_token, resolve_client, server_url
from fleet_server.cli.device_pause import ACTIONS, run_pause
from fleet_server.errors import ApiError, UsageError

__all__ = ["DEFAULT_SERVER", "SYNC_STATES", "api_get", "api_post", "client_of", "format_device",
           "format_devices_table", "format_time", "page_limit", "positive_seconds", "read_token", "register",
           "server_url"]

_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_EVENTS_SHOWN = 10
SYNC_STATES = ("unknown", "in_sync", "drifted", "paused", "refused", "rolled_back", "failed", "fetch_failed")
"""Every ``sync_state`` a device reports (docs/mqtt.md); ``devices --state`` accepts only these."""

_DEVICES_EXAMPLES = """examples:
  fleetctl devices --server http://fleet.example:8080 --token-file read.token
  fleetctl devices --label site=berlin --label ring=canary --online
  fleetctl devices --state failed --json
  fleetctl devices --context lab                      # server and token from fleetctl.yaml
  fleetctl devices --limit 1000 --offset 1000        # the second page of 1,000
"""
_DEVICE_EXAMPLES = """examples:
  fleetctl device gw-berlin-0042
  fleetctl device gw-berlin-0042 --json --http-timeout 30
  FLEET_TOKEN=$(cat read.token) fleetctl device gw-berlin-0042 -o json
  fleetctl device pause gw-berlin-0042 --reason "INC-231: hands off" --token-file admin.token
  fleetctl device pause --label site=berlin --reason "site works until 18:00" --token-file admin.token
  fleetctl device resume --label site=berlin --reason "works done" --token-file admin.token
"""
_ENROLL_EXAMPLES = """examples:
  fleetctl enroll gw-berlin-0042 --label site=berlin --label role=gateway --profile gateway \\
      --reason "new site" --token-file /etc/fleet-server/admin.token
"""


def _error_reason(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return " ".join(doc["error"].split())[:300]
    return "no reason given"


def api_get(server: str, path: str, query: Sequence[tuple[str, str]] = (), *, token: str | None = None,
            timeout: float = 10.0) -> Any:
    """GET ``server + path`` with ``query`` and return the decoded JSON body.

    Raises:
        ApiError: the server cannot be reached, times out, answers an error status (its reason is
            quoted) or a body that is not JSON.
    """
    url = server + path + (("?" + urllib.parse.urlencode(list(query))) if query else "")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - http(s) only
    return _exchange(request, server, path, token, timeout)


def api_post(server: str, path: str, body: Mapping[str, Any], *, token: str | None = None,
             actor: str | None = None, timeout: float = 10.0) -> Any:
    """POST ``body`` as JSON to ``server + path`` (``X-Actor: actor`` when given); return the decoded answer.

    Raises:
        ApiError: the server cannot be reached, times out, answers an error status (its reason is
            quoted) or a body that is not JSON.
    """
    data = json.dumps(dict(body)).encode("utf-8")
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    request = urllib.request.Request(server + path, data=data, method="POST",  # noqa: S310 - http(s) only
                                     headers=headers)
    if actor:
        request.add_header("X-Actor", actor)
    return _exchange(request, server, path, token, timeout)


def _exchange(request: urllib.request.Request, server: str, path: str, token: str | None,
              timeout: float) -> Any:
    """Send ``request`` (with the bearer token when given) and return its decoded JSON answer.

    Raises:
        ApiError: as :func:`api_get` says.
    """
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
            body = response.read(_MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            reason = _error_reason(exc.read(64 * 1024))
        raise ApiError(f"fleet server answered {exc.code}: {reason}") from exc
    except urllib.error.URLError as exc:
        raise ApiError(f"cannot reach the fleet server at {server}: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise ApiError(f"cannot reach the fleet server at {server}: {exc}") from exc
    if len(body) > _MAX_RESPONSE_BYTES:
        raise ApiError(f"fleet server answer is over {_MAX_RESPONSE_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError(f"fleet server answered something that is not JSON from {path}") from exc


def _when(ts: object, now: float) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    age = max(0, int(now - ts))
    if age < 120:
        return f"{age}s ago"
    if age < 7200:
        return f"{age // 60}m ago"
    if age < 172800:
        return f"{age // 3600}h ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def format_time(ts: object) -> str:
    """Return a Unix time as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC), or ``-`` when it is not a number."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _labels(labels: object) -> str:
    if not isinstance(labels, Mapping) or not labels:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _sync_cell(d: Mapping[str, Any]) -> str:
    """The sync state, with ``(paused)`` when the device says it is paused and the state does not."""
    state = _cell(d.get("sync_state"))
    return state + " (paused)" if d.get("paused") and state != "paused" else state


def format_devices_table(devices: Sequence[Mapping[str, Any]], total: int, *, now: float,
                         offset: int = 0) -> str:
    """Return the devices as an aligned text table, with a line saying how many there are in all.

    ``offset`` is how many matching devices come before this page (``--offset``).
    """
    header = ("DEVICE", "ONLINE", "SYNC STATE", "RELEASE", "REVISION", "LAST SEEN", "LABELS")
    rows = [header]
    for d in devices:
        revision = d.get("revision")
        rows.append((_cell(d.get("id")), _cell(d.get("online")), _sync_cell(d),
                     _cell(d.get("release")), revision[:12] if isinstance(revision, str) else "-",
                     _when(d.get("last_seen"), now), _labels(d.get("labels"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    shown = len(devices)
    if shown == total and not offset:
        lines.append(f"{shown} device(s)")
    elif not offset:
        lines.append(f"{shown} of {total} device(s)")
    elif shown:
        lines.append(f"{shown} of {total} device(s): numbers {offset + 1} to {offset + shown}")
    else:
        lines.append(f"0 of {total} device(s): --offset {offset} is past the last one")
    return "\n".join(lines) + "\n"


def format_device(detail: Mapping[str, Any], *, now: float) -> str:
    """Return one device, its newest events and its latest health sample as readable text."""
    d = detail.get("device") or {}
    lines = [
        f"device:      {_cell(d.get('id'))}",
        f"online:      {_cell(d.get('online'))}",
        f"sync state:  {_sync_cell(d)}",
        f"release:     {_cell(d.get('release'))}",
        f"revision:    {_cell(d.get('revision'))}",
        f"profile:     {_cell(d.get('profile'))}",
        f"labels:      {_labels(d.get('labels'))}",
        f"last seen:   {format_time(d.get('last_seen'))} ({_when(d.get('last_seen'), now)})",
    ]
    if d.get("paused"):
        lines.append(f"paused:      {d.get('pause_reason') or 'no reason given'}")
    if d.get("last_error"):
        lines.append(f"last error:  {d['last_error']}")
    if d.get("repeat_count"):
        lines.append(f"repeated:    {d['repeat_count']} sync(s) in a row, the last at "
                     f"{format_time(d.get('repeat_last_seen'))} ({_when(d.get('repeat_last_seen'), now)})")
    events = detail.get("events") or []
    lines.append("events:" if events else "events:      none")
    for e in events[:_EVENTS_SHOWN]:
        reason = f"  {e['reason']}" if e.get("reason") else ""
        kind, release = _cell(e.get("type")), _cell(e.get("release"))
        lines.append(f"  {format_time(e.get('ts'))}  {kind}  release {release}{reason}")
    health = detail.get("health") or []
    if health:
        latest = health[0]
        checks = latest.get("checks") or []
        failing = [c.get("name") for c in checks if isinstance(c, Mapping) and not c.get("ok")]
        lines.append(f"health:      {format_time(latest.get('ts'))}, {len(checks)} check(s), "
                     + (f"failing: {', '.join(map(str, failing))}" if failing else "all passing"))
    return "\n".join(lines) + "\n"


def client_of(args: argparse.Namespace) -> Client:
    """Return the server and token the parsed server options (:func:`server_options`) lead to.

    Raises:
        UsageError: as :func:`fleet_server.cli.credentials.resolve_client` says.
    """
    return resolve_client(args.server, args.token_file, args.context)


def _label_query(values: Sequence[str]) -> list[tuple[str, str]]:
    query: list[tuple[str, str]] = []
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--label must be KEY=VALUE, got {raw!r}")
        query.append(("label", f"{key}={value}"))
    return query


def _run_devices(args: argparse.Namespace) -> int:
    client = client_of(args)
    query = _label_query(args.label or [])
    if args.state:
        query.append(("sync_state", args.state))
    if args.online is not None:
        query.append(("online", "true" if args.online else "false"))
    query += [("limit", str(args.limit)), ("offset", str(args.offset))]
    answer = api_get(client.server, "/api/v1/devices", query, token=client.token, timeout=args.http_timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("devices"), list):
        raise ApiError("fleet server answered an unexpected document for /api/v1/devices")
    if args.json:
        print_json(answer)
        return 0
    devices = answer["devices"]
    total = answer["total"] if isinstance(answer.get("total"), int) else len(devices)
    sys.stdout.write(format_devices_table(devices, total, now=time.time(), offset=args.offset))
    return 0


def _device_document(answer: object, path: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("device"), dict):
        raise ApiError(f"fleet server answered an unexpected document for {path}")
    return answer


def _run_device(args: argparse.Namespace) -> int:
    words = list(args.words)
    if words and words[0] in ACTIONS and (len(words) > 1 or args.label):
        return run_pause(args, words[0], words[1:])
    if args.label or args.reason is not None:
        raise UsageError("--label and --reason go with fleetctl device pause|resume")
    if len(words) != 1:
        raise UsageError("fleetctl device takes one device id (or pause|resume ID)")
    client = client_of(args)
    path = "/api/v1/devices/" + urllib.parse.quote(words[0], safe="")
    answer = _device_document(api_get(client.server, path, token=client.token, timeout=args.http_timeout),
                              path)
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(format_device(answer, now=time.time()))
    return 0


def _labels_of(values: Sequence[str]) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise UsageError(f"--label must be KEY=VALUE, got {raw!r}")
        if key in labels:
            raise UsageError(f"--label {key} is given twice")
        labels[key] = value
    return labels or None


def _run_enroll(args: argparse.Namespace) -> int:
    client = client_of(args)
    body: dict[str, Any] = {"id": args.device_id, "reason": args.reason or ""}
    labels = _labels_of(args.label or [])
    if labels is not None:
        body["labels"] = labels
    if args.profile is not None:
        body["profile"] = args.profile
    answer = _device_document(api_post(client.server, "/api/v1/devices", body, token=client.token,
                                       actor=args.actor, timeout=args.http_timeout), "/api/v1/devices")
    if args.json:
        print_json(answer)
        return 0
    device = answer["device"]
    shown = ", ".join(f"{k}={v}" for k, v in sorted((device.get("labels") or {}).items())) or "no labels"
    verb = "enrolled" if answer.get("created") else "already known, updated"
    sys.stdout.write(f"{device.get('id', args.device_id)}: {verb} ({shown}; profile "
                     f"{device.get('profile') or '-'})\n")
    return 0


def page_limit(text: str) -> int:
    """Parse ``--limit``: a whole number from 1 to 1000 (the API's page size), for argparse.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from exc
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return value



def register(subparsers: Any) -> None:
    """Add the ``devices``, ``device`` and ``enroll`` sub-commands."""
    devices = subparsers.add_parser("devices", help="list the fleet's devices from the fleet server",
                                    parents=[server_options(legacy_timeout=True)],
                                    description="List devices known to the fleet server, ordered by "
                                                "id, one page at a time (--limit, --offset).",
                                    epilog=_DEVICES_EXAMPLES,
                                    formatter_class=ExamplesHelpFormatter)
    add_json_option(devices, "print the server's JSON answer")
    devices.add_argument("--label", action="append", metavar="KEY=VALUE",
                         help="only devices with this label (repeatable: all must match)")
    devices.add_argument("--state", metavar="STATE", choices=SYNC_STATES,
                         help="only devices in this sync state: " + ", ".join(SYNC_STATES))
    online = devices.add_mutually_exclusive_group()
    online.add_argument("--online", dest="online", action="store_const", const=True, default=None,
                        help="only devices that are online")
    online.add_argument("--offline", dest="online", action="store_const", const=False,
                        help="only devices that are offline")
    devices.add_argument("--limit", type=page_limit, default=1000,
                         help="at most this many devices, 1 to 1000 (default: 1000)")
    devices.add_argument("--offset", type=page_offset, default=0, metavar="N",
                         help="skip the first N matching devices, for the next page (default: 0)")
    devices.set_defaults(func=_run_devices)

    device = subparsers.add_parser(
        "device", help="show one device, or pause or resume devices remotely (admin token)",
        parents=[server_options(legacy_timeout=True)],
        description="Show one device, its newest events and health. `device pause ID --reason TEXT` "
                    "(or --label KEY=VALUE) stops the device applying changes, drift correction "
                    "included, until `device resume`; it keeps reporting, and a pause made on the "
                    "device itself (edge-agent pause) stays until it is lifted there. Audited.",
        epilog=_DEVICE_EXAMPLES,
        formatter_class=ExamplesHelpFormatter)
    device.add_argument("words", nargs="+", metavar="ID | pause|resume [ID]",
                        help="the device id to show, or pause/resume and the device id")
    device.add_argument("--label", action="append", metavar="KEY=VALUE",
                        help="pause/resume: every device with this label (repeatable: all must match)")
    device.add_argument("--reason", metavar="TEXT", help="pause/resume: why (required to pause; audited, "
                                                         "shown on the device)")
    device.add_argument("--actor", default=os.environ.get("USER") or None, metavar="NAME",
                        help="pause/resume: who, for the audit log (default: $USER)")
    add_json_option(device, "print the server's JSON answer")
    device.set_defaults(func=_run_device)

    enroll = subparsers.add_parser(
        "enroll", help="make a device known to the fleet server before it reports (admin token)",
        parents=[server_options("admin", legacy_timeout=True)],
        description="Enroll a device: with ingest.unknown_devices: refuse only enrolled devices are "
                    "heard. Labels and a profile given here hold until the device reports its own. "
                    "Enrolling a known device again sets what is given. Recorded in the audit log.",
        epilog=_ENROLL_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    enroll.add_argument("device_id", metavar="ID", help="the device id (as in its agent.yaml)")
    enroll.add_argument("--label", action="append", metavar="KEY=VALUE",
                        help="a label for rollout selectors until the device reports its own (repeatable)")
    enroll.add_argument("--profile", metavar="NAME", help="the device profile (e.g. gateway)")
    enroll.add_argument("--reason", metavar="TEXT", help="why, for the audit log")
    enroll.add_argument("--actor", default=os.environ.get("USER") or None, metavar="NAME",
                        help="who, for the audit log (default: $USER)")
    add_json_option(enroll, "print the server's JSON answer")
    enroll.set_defaults(func=_run_enroll)
