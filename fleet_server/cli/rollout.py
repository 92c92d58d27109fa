"""`fleetctl rollout start|status|watch|devices|pause|resume|promote|abort|rollback`: the fleet server's
rollouts.

Talks to ``/api/v1/rollouts`` with the same client and server options as ``fleetctl devices``
(the admin token for the actions, or the read token for ``status``/``watch``).
``--actor`` (default ``$USER``) is sent as ``X-Actor`` and lands in the audit log.

``watch`` draws one hand-rolled text progress bar per wave (``#`` done, ``x`` failed, ``o``
offline, ``.`` pending) with the counts; on a terminal it redraws in place, otherwise it prints a
line per change. It exits 0 when the rollout succeeded (also when a newer rollout superseded it
since: that is a separate fact), 1 when it halted, rolled back, was aborted or was superseded
before it finished, or when ``--timeout`` passed first. ``watch --json`` prints one compact JSON
object a line, only when the rollout changed.

``status`` and ``watch`` read the rollout's summary (waves with counts, never a per-device map);
``devices`` lists the rollout's devices one page at a time, filtered by wave and state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_core.durations import parse_cli_seconds
from edge_core.errors import BundleError, YamlError
from edge_core.yamlsafe import load_yaml
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, print_json, server_options
from fleet_server.cli.devices import (
    api_get,
    api_post,
    client_of,
)
from fleet_server.errors import ApiError, UsageError

__all__ = ["BAR_WIDTH", "format_devices", "format_rollout", "format_rollouts", "progress_bar", "register",
           "watch_exit_code"]

BAR_WIDTH = 30
_BASE = "/api/v1/rollouts"
_ACTIONS = ("pause", "resume", "promote", "abort", "rollback")
_FAILED_END = ("halted", "rolled_back", "aborted", "superseded")
_KINDS = ("done", "failed", "offline", "pending")
_MARKS = {"done": "#", "failed": "x", "offline": "o", "pending": "."}


def progress_bar(progress: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """Return ``[###xo....]``: the wave's devices by kind, scaled to ``width`` characters (deferred
    and skipped devices count as pending)."""
    counts = {k: int(progress.get(k, 0) or 0) for k in _KINDS}
    counts["pending"] += int(progress.get("deferred", 0) or 0) + int(progress.get("skipped", 0) or 0)
    total = sum(counts.values())
    if total == 0:
        return "[" + " " * width + "]"
    cells = ""
    for kind in _KINDS:
        cells += _MARKS[kind] * round(width * counts[kind] / total)
    cells = (cells + "." * width)[:width]
    return f"[{cells}]"


def _wave_line(index: int, wave: Mapping[str, Any], current: int) -> str:
    p = wave.get("progress") or {}
    marker = ">" if index == current else " "
    counts = (f"done {p.get('done', 0)}  failed {p.get('failed', 0)}  pending {p.get('pending', 0)}  "
              f"offline {p.get('offline', 0)}")
    extra = f"  deferred {p['deferred']}" if p.get("deferred") else ""
    result = f"  {wave['result']}" if wave.get("result") else ""
    name = f"{wave.get('name', '')!s:<12}"
    return f"{marker} wave {index + 1} {name} {progress_bar(p)} {counts}{extra}{result}"


def format_rollout(r: Mapping[str, Any]) -> str:
    """Return one rollout as text: its header, a progress bar per wave, and why it halted."""
    commit = str(r.get("commit") or "")[:12]
    lines = [f"rollout {r.get('id')}  release {r.get('release')} ({commit})  previous {r.get('previous')}  "
             f"plan {r.get('plan')}",
             f"phase {r.get('phase')}  wave {int(r.get('wave', 0)) + 1} of {len(r.get('waves') or [])}"
             + (f"  superseded by {r['superseded_by']}" if r.get("superseded_by") else "")]
    for i, wave in enumerate(r.get("waves") or []):
        lines.append(_wave_line(i, wave, int(r.get("wave", 0))))
    if r.get("halted_reason"):
        lines.append(f"halted: {r['halted_reason']}")
    if r.get("phase") == "waiting_approval":
        lines.append(_approval_line(r))
    if r.get("device_count") is not None:
        lines.append(f"{r['device_count']} device(s): fleetctl rollout devices {r.get('id')} lists them")
    return "\n".join(lines) + "\n"


def _approval_line(r: Mapping[str, Any]) -> str:
    waves = r.get("waves") or []
    current = int(r.get("wave", 0))
    gated = current if current < len(waves) and not waves[current].get("started") else current + 1
    command = f"fleetctl rollout promote {r.get('id')} --wave {current + 1} --reason ..."
    if gated >= len(waves):
        return f"waiting for approval to finish: {command}"
    return f"waiting for approval before wave {gated + 1} ({waves[gated].get('name', '')}) starts: {command}"


def format_devices(page: Mapping[str, Any]) -> str:
    """Return one page of a rollout's devices as an aligned table, with where it sits in the total."""
    rows = [("DEVICE", "WAVE", "STATE", "ONLINE", "TARGET", "VERSION", "REASON")]
    devices = page.get("devices") or []
    for d in devices:
        rows.append((str(d.get("id")), str(int(d.get("wave", 0)) + 1), str(d.get("state")),
                     "yes" if d.get("online") else "no", str(d.get("target") or "-"),
                     "-" if d.get("version") is None else str(d.get("version")), str(d.get("reason") or "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    offset, total = int(page.get("offset", 0) or 0), int(page.get("total", 0) or 0)
    where = f"{offset + 1}-{offset + len(devices)} of {total}" if devices else f"none of {total}"
    return "\n".join(lines) + f"\ndevices {where}\n"


def format_rollouts(rollouts: Sequence[Mapping[str, Any]]) -> str:
    """Return the rollout list as an aligned table."""
    rows = [("ROLLOUT", "RELEASE", "PREVIOUS", "PHASE", "WAVE", "ACTOR", "SUPERSEDED BY")]
    for r in rollouts:
        rows.append((str(r.get("id")), str(r.get("release")), str(r.get("previous")), str(r.get("phase")),
                     str(int(r.get("wave", 0)) + 1), str(r.get("actor") or "-"),
                     str(r.get("superseded_by") or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines) + f"\n{len(rollouts)} rollout(s)\n"


def watch_exit_code(phase: str) -> int | None:
    """Return the exit code ``watch`` ends with in ``phase`` (0 succeeded, 1 failed ends), None to go on."""
    if phase == "succeeded":
        return 0
    return 1 if phase in _FAILED_END else None


def _client(args: argparse.Namespace) -> tuple[str, str | None]:
    client = client_of(args)
    return client.server, client.token


def _get_rollout(args: argparse.Namespace, rollout_id: str | None) -> dict[str, Any]:
    server, token = _client(args)
    if rollout_id is None:
        listing = api_get(server, _BASE, [("limit", "1")], token=token, timeout=args.http_timeout)
        rollouts = listing.get("rollouts") if isinstance(listing, dict) else None
        if not rollouts:
            raise UsageError("the fleet server has no rollout yet")
        rollout_id = str(rollouts[0]["id"])
    answer = api_get(server, f"{_BASE}/{urllib.parse.quote(rollout_id, safe='')}", token=token,
                     timeout=args.http_timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("waves"), list):
        raise ApiError(f"fleet server answered an unexpected document for rollout {rollout_id}")
    return answer


def _load_plan(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
    try:
        return load_yaml(data, name=str(path)).value
    except (YamlError, BundleError) as exc:
        raise UsageError(f"plan {path}: {exc}") from exc


def _run_start(args: argparse.Namespace) -> int:
    server, token = _client(args)
    body: dict[str, Any] = {"release": args.release, "reason": args.reason or ""}
    if args.plan is not None:
        body["plan"] = _load_plan(args.plan)
    if args.plan_name is not None:
        body["plan_name"] = args.plan_name
    if args.preflight:
        body["preflight"] = True
    answer = api_post(server, _BASE, body, token=token, actor=args.actor, timeout=args.http_timeout)
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(f"rollout {answer.get('id')} of release {answer.get('release')} started "
                         f"(plan {answer.get('plan')})\n")
    return 0


def format_preflight(doc: dict[str, Any]) -> str:
    """Return a rollout's preflight summary as readable text."""
    counts = doc.get("counts") or {}
    labels = (("change", "would change"), ("nochange", "would change nothing"), ("refused", "would refuse"),
              ("waiting", "not answered"), ("offline", "offline"))
    lines = [f"preflight of rollout {doc.get('id')}: {doc.get('state')}",
             "  " + ", ".join(f"{counts.get(k, 0)} {label}" for k, label in labels)]
    for group in doc.get("refusals") or []:
        shown = ", ".join(group.get("examples") or [])
        lines.append(f"  refused by {group.get('devices')}: {group.get('reason')}  ({shown})")
    if doc.get("offline"):
        lines.append(f"  offline (checked when they come back): {', '.join(doc['offline'])}")
    return "\n".join(lines) + "\n"


def _run_preflight(args: argparse.Namespace) -> int:
    server, token = _client(args)
    path = f"{_BASE}/{urllib.parse.quote(args.rollout_id, safe='')}/preflight"
    answer = api_get(server, path, token=token, timeout=args.http_timeout)
    if not isinstance(answer, dict):
        raise UsageError("the fleet server answered an unexpected preflight document")
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(format_preflight(answer))
    return 0 if answer.get("state") != "failed" else 1


def _run_status(args: argparse.Namespace) -> int:
    if args.rollout_id is None:
        server, token = _client(args)
        answer = api_get(server, _BASE, token=token, timeout=args.http_timeout)
        if args.json:
            print_json(answer)
        else:
            sys.stdout.write(format_rollouts(answer.get("rollouts") or []))
        return 0
    rollout = _get_rollout(args, args.rollout_id)
    if args.json:
        print_json(rollout)
    else:
        sys.stdout.write(format_rollout(rollout))
    return 0


def _run_devices(args: argparse.Namespace) -> int:
    server, token = _client(args)
    query: list[tuple[str, str]] = [("offset", str(args.offset)), ("limit", str(args.limit))]
    if args.wave is not None:
        query.append(("wave", str(args.wave - 1)))
    if args.state is not None:
        query.append(("state", args.state))
    path = f"{_BASE}/{urllib.parse.quote(args.rollout_id, safe='')}/devices"
    answer = api_get(server, path, query, token=token, timeout=args.http_timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("devices"), list):
        raise ApiError(f"fleet server answered an unexpected document for the devices of {args.rollout_id}")
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(format_devices(answer))
    return 0


def _count(minimum: int, maximum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}")
        return value
    return parse


def _run_watch(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    tty = sys.stdout.isatty() and not args.json
    drawn = 0
    last: dict[int, str] = {}
    last_phase = ""
    last_json = ""
    rollout_id = args.rollout_id
    while True:
        r = _get_rollout(args, rollout_id)
        rollout_id = str(r["id"])
        phase = str(r.get("phase"))
        if args.json:
            line = json.dumps({"id": rollout_id, "phase": phase, "wave": r.get("wave"),
                               "halted_reason": r.get("halted_reason"),
                               "waves": [{"name": w.get("name"), "result": w.get("result"),
                                          "progress": w.get("progress")} for w in r["waves"]]},
                              sort_keys=True, separators=(",", ":"))
            if line != last_json:
                sys.stdout.write(line + "\n")
                last_json = line
        elif tty:
            text = format_rollout(r)
            sys.stdout.write((f"\x1b[{drawn}F\x1b[J" if drawn else "") + text)
            drawn = text.count("\n")
        else:
            if phase != last_phase:
                sys.stdout.write(f"{time.strftime('%H:%M:%S')} rollout {rollout_id} {phase}"
                                 + (f": {r['halted_reason']}" if r.get("halted_reason") else "") + "\n")
            for i, wave in enumerate(r["waves"]):
                line = _wave_line(i, wave, int(r.get("wave", 0)))[2:]
                if last.get(i) != line:
                    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {line}\n")
                    last[i] = line
        last_phase = phase
        sys.stdout.flush()
        code = watch_exit_code(phase)
        if code is not None:
            return code
        if time.monotonic() + args.interval > deadline:
            sys.stderr.write(f"fleetctl: rollout {rollout_id} still {phase} after {args.timeout:g}s\n")
            return 1
        time.sleep(args.interval)


def _run_action(args: argparse.Namespace) -> int:
    server, token = _client(args)
    body: dict[str, Any] = {"reason": args.reason}
    if getattr(args, "wave", None) is not None:
        body["wave"] = args.wave - 1
    path = f"{_BASE}/{urllib.parse.quote(args.rollout_id, safe='')}/{args.action}"
    answer = api_post(server, path, body, token=token, actor=args.actor, timeout=args.http_timeout)
    if args.json:
        print_json(answer)
    else:
        sys.stdout.write(f"rollout {answer.get('id')}: {args.action} done, now {answer.get('phase')}\n")
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from exc
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError("must be a finite number of seconds more than 0")
    return value


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", default=os.environ.get("USER") or None,
                        help="your name in the audit log (default: $USER)")
    add_json_option(parser, "print the server's JSON answer")


_EXAMPLES = {
    "start": """examples:
  fleetctl rollout start --release 12 --plan-name default --reason "nginx 1.25" --token-file admin.token
  fleetctl rollout start --release 12 --plan rollouts/canary.yaml --reason "canary first" --json
  fleetctl rollout start --release 12 --preflight --reason "plan everywhere first"
""",
    "preflight": """examples:
  fleetctl rollout preflight r-20260105-1       # exit 1 when it failed
  fleetctl rollout preflight r-20260105-1 --json | jq .refusals
""",
    "status": """examples:
  fleetctl rollout status                       # every rollout, newest first
  fleetctl rollout status r-20260105-1 --json
""",
    "watch": """examples:
  fleetctl rollout watch                        # the newest rollout, until it ends
  fleetctl rollout watch r-20260105-1 --timeout 2h --interval 5
  fleetctl rollout watch --json | jq -c .phase  # one JSON object a line, only on change
""",
    "devices": """examples:
  fleetctl rollout devices r-20260105-1 --wave 2 --state failed
  fleetctl rollout devices r-20260105-1 --offset 100 --limit 100 --json
""",
    "pause": """examples:
  fleetctl rollout pause r-20260105-1 --reason "investigating failed canary"
""",
    "resume": """examples:
  fleetctl rollout resume r-20260105-1 --reason "fixed the health check"
""",
    "promote": """examples:
  fleetctl rollout promote r-20260105-1 --reason "canaries look good"
  fleetctl rollout promote r-20260105-1 --wave 3 --reason "approved by ops"
""",
    "abort": """examples:
  fleetctl rollout abort r-20260105-1 --reason "wrong release" --token-file admin.token
""",
    "rollback": """examples:
  fleetctl rollout rollback r-20260105-1 --reason "errors in wave 2" --json
""",
}


def _duration(text: str) -> float:
    """Parse ``watch --timeout``: seconds (``90``) or a duration with a unit (``90m``, ``2h``)."""
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        try:
            value = float(parse_cli_seconds(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
        return _positive(str(value))


def register(subparsers: Any) -> None:
    """Add the ``rollout`` command group."""
    rollout = subparsers.add_parser("rollout", help="start, watch and steer rollouts on the fleet server",
                                    description="Start, watch and steer canary rollouts.",
                                    epilog="examples:\n" + "".join(
                                        e.removeprefix("examples:\n") for e in _EXAMPLES.values()),
                                    formatter_class=ExamplesHelpFormatter)
    sub = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    reads = server_options("read")
    admin = server_options("admin")

    def action(name: str, text: str, parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + ".", epilog=_EXAMPLES[name],
            formatter_class=ExamplesHelpFormatter, parents=[parent])
        return parser

    start = action("start", "start a rollout of a signed release (admin token)", admin)
    start.add_argument("--release", type=int, required=True, metavar="V", help="the signed release version")
    plan = start.add_mutually_exclusive_group()
    plan.add_argument("--plan", type=Path, metavar="FILE", help="a rollout plan YAML file (sent inline)")
    plan.add_argument("--plan-name", metavar="NAME", help="a plan the server knows (rollouts/NAME.yaml)")
    start.add_argument("--reason", default="", help="why (recorded in the audit log)")
    start.add_argument("--preflight", action="store_true",
                       help="every targeted device plans the release first; the first wave starts only "
                            "when the preflight passes (see fleetctl rollout preflight)")
    _client_options(start)
    start.set_defaults(func=_run_start)

    preflight = action("preflight", "show a rollout's preflight: what its devices would do", reads)
    preflight.add_argument("rollout_id", metavar="ID", help="the rollout")
    _client_options(preflight)
    preflight.set_defaults(func=_run_preflight)

    status = action("status", "list rollouts, or show one with its waves", reads)
    status.add_argument("rollout_id", nargs="?", metavar="ID", help="the rollout (default: list them)")
    _client_options(status)
    status.set_defaults(func=_run_status)

    watch = action("watch", "follow a rollout wave by wave until it ends", reads)
    watch.add_argument("rollout_id", nargs="?", metavar="ID", help="the rollout (default: the newest)")
    watch.add_argument("--timeout", type=_duration, default=3600.0, metavar="DURATION",
                       help="the overall limit: give up (exit 1) after this long, in seconds or with a "
                            "unit such as 90m or 2h (default: 3600); --http-timeout bounds each request")
    watch.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                       help="seconds between refreshes (default: 1)")
    _client_options(watch)
    watch.set_defaults(func=_run_watch)

    devices = action("devices", "list a rollout's devices, one page at a time", reads)
    devices.add_argument("rollout_id", metavar="ID", help="the rollout")
    devices.add_argument("--wave", type=_count(1, 1000), metavar="N",
                         help="only the devices of wave N (1-based)")
    devices.add_argument("--state", metavar="STATE",
                         help="only the devices in this state (applied, failed, ...)")
    devices.add_argument("--offset", type=_count(0, 10**9), default=0, metavar="N",
                         help="skip the first N devices (default: 0)")
    devices.add_argument("--limit", type=_count(1, 1000), default=100, metavar="N",
                         help="devices per page, at most 1000 (default: 100)")
    _client_options(devices)
    devices.set_defaults(func=_run_devices)

    for name in _ACTIONS:
        p = action(name, f"{name} a rollout (admin token)", admin)
        p.add_argument("rollout_id", metavar="ID", help="the rollout")
        p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        if name == "promote":
            p.add_argument("--wave", type=int, metavar="N", help="the wave (1-based) you approve")
        _client_options(p)
        p.set_defaults(func=_run_action, action=name)
