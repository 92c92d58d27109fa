"""`fleetctl lint REPO_DIR`: schema and policy checks of a config repo, for its CI."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_core.profiles import INSTALLED_PROFILE_DIR
from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, print_json
from fleet_server.errors import UsageError
from fleet_server.lint import lint_repo

__all__ = ["default_profile_dirs", "register", "run"]


def default_profile_dirs() -> list[Path]:
    """Return where profiles are read from when ``--profiles`` is not given.

    From a source checkout: its ``device_profiles/`` (found next to the ``fleet_server`` package);
    otherwise the installed ``/usr/share/edge-agent/profiles``.
    """
    checkout = Path(__file__).resolve().parent.parent.parent / "device_profiles"
    return [checkout] if checkout.is_dir() else [INSTALLED_PROFILE_DIR]


def register(subparsers: Any) -> None:
    """Add the ``lint`` sub-command to ``subparsers``."""
    p = subparsers.add_parser(
        "lint", help="check a config repo (schema, payloads, profiles, plaintext secrets)",
        description="Check a config repo and print every problem as FILE:LINE: SEVERITY: REASON. "
                    "Exits 1 when any error is found (warnings alone exit 0).",
        epilog="""examples:
  fleetctl lint config/
  fleetctl lint config/ --profiles device_profiles/ --json    # for CI: one JSON document
""", formatter_class=ExamplesHelpFormatter,
    )
    p.add_argument("repo_dir", metavar="REPO_DIR", type=Path, help="the config repo's working tree")
    p.add_argument("--profiles", metavar="DIR", type=Path, action="append", default=None,
                   help="a device-profile directory (repeatable; default: the checkout's device_profiles/ "
                        "or /usr/share/edge-agent/profiles)")
    add_json_option(p, "print the problems as one JSON document")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Lint ``args.repo_dir``; print the problems and a summary; return 1 when any is an error.

    Raises:
        UsageError: REPO_DIR is not a directory.
        ConfigError: a device profile is invalid.
    """
    repo: Path = args.repo_dir
    if not repo.is_dir():
        raise UsageError(f"{repo} is not a directory")
    dirs: list[Path] = args.profiles or default_profile_dirs()
    problems = lint_repo(repo, dirs)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    if args.json:
        print_json({"repo": str(repo), "errors": errors, "warnings": warnings,
                    "problems": [asdict(p) for p in problems]})
    else:
        for p in problems:
            sys.stdout.write(f"{p.file}:{p.line}: {p.severity}: {p.reason}\n")
        sys.stdout.write(f"{repo}: {errors} error(s), {warnings} warning(s)\n")
    return 1 if errors else 0
