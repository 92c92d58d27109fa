"""``edge-agent``: the device agent's command line. Parses, calls one function, prints, maps errors.

Exit codes: 0 success; 1 an expected failure (one line on stderr, no traceback) — an invalid config,
a refused, rolled-back or failed release, an unreachable mirror, a held apply lock; 2 usage errors
(argparse). Logs go to stderr as one JSON object a line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from edge_core.errors import EdgeFleetError
from edge_core.logs import release_words, setup_logging

if TYPE_CHECKING:
    from edge_agent.results import SyncResult

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

_OK_OUTCOMES = frozenset({"applied", "noop", "paused"})


def _config(args: argparse.Namespace) -> AgentConfig:
    config = load_config(Path(args.config))
    setup_logging(config.log_level)
    return config


def _emit(args: argparse.Namespace, doc: dict[str, object], text: str) -> None:
    if args.json:
        json.dump(doc, sys.stdout, sort_keys=True)
    else:
        sys.stdout.write(text)
    sys.stdout.write("\n")


def _cmd_init(args: argparse.Namespace) -> int:
    from edge_agent.identity import init_identity  # noqa: PLC0415 - each command loads only what it uses

    config = _config(args)
    ident = init_identity(config.state_dir)
    if args.json:
        json.dump({"device": config.device_id, "signing_public": ident.signing_public,
                   "encryption_public": ident.encryption_public, "created": ident.created}, sys.stdout)
        sys.stdout.write("\n")
    else:
        verb = "created" if ident.created else "exists"
        sys.stdout.write(f"device {config.device_id}: identity {verb}\n"
                         f"identity key:   {ident.signing_public}\n"
                         f"encryption key: {ident.encryption_public}\n")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.daemon import Daemon, install_signal_handlers  # noqa: PLC0415

    config = _config(args)
    stop = threading.Event()
    install_signal_handlers(stop)
    Daemon(config, stop=stop).run()
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from edge_agent.agent import sync_once  # noqa: PLC0415

    return _print_sync(args, sync_once(_config(args), want=args.want))


def _cmd_import(args: argparse.Namespace) -> int:
    from edge_agent.agent import import_release  # noqa: PLC0415

    return _print_sync(args, import_release(_config(args), Path(args.file)))


def _print_sync(args: argparse.Namespace, result: SyncResult) -> int:
    """Print one sync's result (``--json``: one object); return 0 for an outcome that is not a failure."""
    if args.json:
        json.dump({"outcome": result.outcome, "release": result.version, "commit": result.commit,
                   "reason": result.reason, "step": result.step, "changes": result.changes}, sys.stdout)
        sys.stdout.write("\n")
    else:
        line = f"{result.outcome}: {release_words(result.version, result.commit)} changes {result.changes}"
        sys.stdout.write(line + "\n")
    if result.outcome in _OK_OUTCOMES:
        return 0
    where = f" at {result.step}" if result.step else ""
    sys.stderr.write(f"edge-agent: sync {result.outcome}{where}: {result.reason or 'no reason given'}\n")
    return 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from edge_agent.agent import plan_only  # noqa: PLC0415

    config = _config(args)
    text = plan_only(config, want=args.want, as_json=args.json)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_agent.agent import status  # noqa: PLC0415

    config = _config(args)
    info = status(config)
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    inst = info.get("installed")
    lines = [f"device:    {info['device']} ({info['profile']}, {info['mode']})",
             f"repo:      {info['repo']} ({info['branch']})"]
    if inst:
        lines.append(f"installed: release {inst['version']} commit {inst['commit']}")
        lines.append(f"bundles:   {', '.join(inst['bundles']) or '(none)'}")
    else:
        lines.append("installed: nothing yet")
    lines.append(f"floor:     {info['floor']}")
    lines.append(f"managed:   {info['managed']} resource(s)")
    if info.get("last_sync"):
        last = info["last_sync"]
        lines.append(f"last sync: {last['kind']} at {last['ts']}: {last['detail']}")
    if info.get("paused"):
        lines.append(f"PAUSED:    {info['paused']}")
    if info.get("open_transaction"):
        lines.append(f"open transaction: {info['open_transaction']} (undone at the next sync)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    from edge_agent.agent import pause  # noqa: PLC0415

    config = _config(args)
    pause(config, args.reason)
    _emit(args, {"device": config.device_id, "paused": True, "reason": args.reason.strip()},
          f"device {config.device_id}: paused ({args.reason.strip()})")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from edge_agent.agent import resume, status  # noqa: PLC0415

    config = _config(args)
    resume(config)
    still = status(config).get("paused_by_fleet_server")
    text = f"device {config.device_id}: resumed"
    if still:
        text += f"; still paused by the fleet server ({still}) until it resumes the device"
    _emit(args, {"device": config.device_id, "paused": bool(still), "paused_by_fleet_server": still}, text)
    return 0


_EXAMPLES = {
    "init": "edge-agent init\n  edge-agent init --json --config /etc/edge-agent/agent.yaml",
    "run": "edge-agent run                       # as the systemd unit does\n"
           "  edge-agent run --config ./agent.yaml",
    "sync": "edge-agent sync --once\n"
            "  edge-agent sync --want 9f2c4e1 --json   # a signed commit, not the head",
    "plan": "edge-agent plan                      # the diff a sync would apply\n"
            "  edge-agent plan --want 9f2c4e1 -o json",
    "status": "edge-agent status\n  edge-agent status --json | jq .installed",
    "pause": 'edge-agent pause --reason "debugging nginx by hand"\n'
             '  edge-agent pause --reason "INC-42" --json',
    "resume": "edge-agent resume\n  edge-agent resume --json",
    "import": "edge-agent import /media/usb/release-7.bundle   # a device without a mirror\n"
              "  edge-agent import release-7.bundle --json",
}


class _ExamplesFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the description as usual and prints the examples epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def _json_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False)) or getattr(args, "output", "text") == "json"


def build_parser() -> argparse.ArgumentParser:
    """Build the ``edge-agent`` argument parser with every sub-command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), metavar="F",
                        help=f"agent configuration file (default {DEFAULT_CONFIG_PATH})")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    output.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="output format: -o json is --json (default: text)")
    parser = argparse.ArgumentParser(prog="edge-agent", description="The edge-fleet device agent.",
                                     epilog="examples:\n" + "".join(f"  {e}\n" for e in _EXAMPLES.values()),
                                     formatter_class=_ExamplesFormatter)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str,
            prints: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, output] if prints else [common], help=text,
                           description=text, epilog=f"examples:\n  {_EXAMPLES[name]}\n",
                           formatter_class=_ExamplesFormatter)
        p.set_defaults(func=func)
        return p

    add("init", _cmd_init, "create the device identity keys and print the public keys")
    add("run", _cmd_run, "the daemon: sync, watch drift and report until stopped", prints=False)
    p = add("sync", _cmd_sync, "one fetch, verify, plan, apply, health and record cycle")
    p.add_argument("--once", action="store_true", help="run one cycle and exit (the only mode; accepted "
                   "for scripts)")
    p.add_argument("--want", metavar="COMMIT", help="apply this signed commit instead of the branch head")
    p = add("plan", _cmd_plan, "show what a sync would change, as a diff; changes nothing")
    p.add_argument("--want", metavar="COMMIT", help="plan this signed commit instead of the branch head")
    add("status", _cmd_status, "show the installed release and the agent's state")
    add("pause", _cmd_pause, "break-glass: stop applying and enforcing (audited and reported)").add_argument(
        "--reason", required=True, help="why the device is paused (recorded and reported)")
    add("resume", _cmd_resume, "apply and enforce again after pause")
    add("import", _cmd_import, "apply the signed release in a bundle file (fleetctl release export), with "
        "the same checks and transaction as a sync").add_argument("file", metavar="FILE",
                                                                  help="the bundle file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edge-agent``; return the exit code (0 ok, 1 expected failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = _json_requested(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EdgeFleetError as exc:
        sys.stderr.write(f"edge-agent: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("edge-agent: interrupted\n")
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"edge-agent: {exc.strerror or exc}{where}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
