"""`fleetctl`: the operator's command line. Parses, calls one function per command, maps errors."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from edge_core.errors import EdgeFleetError
from fleet_server import __version__
from fleet_server.cli.common import ExamplesHelpFormatter, json_requested
from fleet_server.errors import FleetError, LintFailed

__all__ = ["build_parser", "main"]

# Each module in fleet_server/cli/ exports register(subparsers) which adds its sub-command(s)
# and sets ``func`` (args -> exit code) on the parser it adds.
COMMAND_MODULES = ("keys", "release", "secret", "lint", "broker", "devices", "history", "rollout", "context",
                   "notifications")


_EXAMPLES = """examples:
  fleetctl lint config/ && fleetctl release sign config/ --key alice.key --expires 30d
  fleetctl config set --server https://fleet.example:8443 --token-file ~/read.token
  fleetctl rollout start --release 12 --reason "nginx 1.25" && fleetctl rollout watch
  fleetctl devices --state failed -o json
  fleetctl COMMAND --help              # each command's options and examples
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="fleetctl", description="Operate an edge-fleet fleet.",
                                     epilog=_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"fleet_server.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run fleetctl; return the process exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = json_requested(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LintFailed:
        return 1
    except (EdgeFleetError, FleetError) as exc:
        sys.stderr.write(f"fleetctl: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("fleetctl: interrupted\n")
        return 130
    except OSError as exc:
        sys.stderr.write(f"fleetctl: {exc.strerror or exc}: {exc.filename or ''}\n".replace(": \n", "\n"))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
