"""`fleetctl config set|show`: the contexts of fleetctl's config file (server URL and token).

Where the file is and how its values rank against options and the environment:
:mod:`fleet_server.cli.credentials`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fleet_server.cli.common import ExamplesHelpFormatter, add_json_option, emit, server_options
from fleet_server.cli.credentials import config_path, resolve_client, save_context
from fleet_server.errors import UsageError

__all__ = ["register"]

_MAX_TOKEN_BYTES = 4096
_SET_EXAMPLES = """examples:
  fleetctl config set --context prod --server https://fleet.example:8443 --token-file ~/prod-read.token
  fleetctl config set --context lab --server http://127.0.0.1:8080 --token-stdin < lab.token
  fleetctl config set --context lab --use        # make lab the current context
"""
_SHOW_EXAMPLES = """examples:
  fleetctl config show                 # the server and where the token comes from (never the token)
  fleetctl config show --context lab --json
  FLEET_SERVER=http://10.0.0.5:8080 fleetctl config show
"""


def _run_set(args: argparse.Namespace) -> int:
    token: str | None = None
    if args.token_stdin:
        data = sys.stdin.buffer.read(_MAX_TOKEN_BYTES + 1)
        token = data.strip().decode("utf-8", "replace")
        if not token or len(data) > _MAX_TOKEN_BYTES:
            raise UsageError("--token-stdin: the token on stdin is empty or over 4 KiB")
    if args.server is None and args.token_file is None and token is None and not args.use:
        raise UsageError("nothing to set: give --server, --token-file, --token-stdin or --use")
    path = save_context(args.context, server=args.server, token_file=args.token_file, token=token,
                        use=args.use)
    emit({"path": str(path), "context": args.context}, f"{path}: context {args.context} saved",
         as_json=args.json)
    return 0


def _token_source(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        return f"--token-file {args.token_file}"
    if os.environ.get("FLEET_TOKEN", "").strip():
        return "$FLEET_TOKEN"
    return f"{config_path()} (context)"


def _run_show(args: argparse.Namespace) -> int:
    client = resolve_client(args.server, args.token_file, args.context)
    info: dict[str, Any] = {"config": str(config_path()), "server": client.server,
                            "token": None if client.token is None else _token_source(args)}
    text = (f"config file: {info['config']}\nserver:      {client.server}\n"
            f"token:       {info['token'] or 'none'}")
    emit(info, text, as_json=args.json)
    return 0


def register(subparsers: Any) -> None:
    """Add ``config set`` and ``config show``."""
    group = subparsers.add_parser(
        "config", help="save and show the fleet server URL and token (contexts)",
        description="Save named contexts (server URL and token) in $XDG_CONFIG_HOME/edge-fleet/"
                    "fleetctl.yaml (directory 0700, file 0600) and show what a command would use. "
                    "Options win over $FLEET_SERVER / $FLEET_TOKEN / $FLEET_CONTEXT, which win over "
                    "the file.",
        epilog=_SET_EXAMPLES + _SHOW_EXAMPLES.removeprefix("examples:\n"),
        formatter_class=ExamplesHelpFormatter)
    sub = group.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    set_ = sub.add_parser("set", help="save or update a context",
                          description="Save or update a context; the first one saved becomes current.",
                          epilog=_SET_EXAMPLES, formatter_class=ExamplesHelpFormatter)
    set_.add_argument("--context", default="default", metavar="NAME", help="the context (default: default)")
    set_.add_argument("--server", metavar="URL", help="the fleet server base URL")
    token = set_.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the API token")
    token.add_argument("--token-stdin", action="store_true",
                       help="read the token from stdin and keep it in the (0600) config file")
    set_.add_argument("--use", action="store_true", help="make this the current context")
    add_json_option(set_, "print the result as JSON")
    set_.set_defaults(func=_run_set)

    show = sub.add_parser("show", help="show the server and token source a command would use",
                          description="Show the server a command would call and where its token "
                                      "comes from, after options, environment and config file.",
                          epilog=_SHOW_EXAMPLES, formatter_class=ExamplesHelpFormatter,
                          parents=[server_options()])
    add_json_option(show, "print the result as JSON")
    show.set_defaults(func=_run_show)
