"""``fleet-server migrate`` and ``fleet-server store copy``: the commands that work on a whole store
instead of running the server. Each prints one line (or a short table) and returns; failures are
raised for the entry point to print in one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fleet_server.config import ServerConfig, StoreConfig, parse_server_config
from fleet_server.store import FleetStore, open_store
from fleet_server.store.copy import copy_store

__all__ = ["copy_command", "migrate", "register", "store_from_url"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``migrate`` and ``store copy`` to ``fleet-server``'s sub-commands."""
    subparsers.add_parser("migrate", help="apply the store's schema migrations and exit")
    store = subparsers.add_parser("store", help="work on a whole store")
    actions = store.add_subparsers(dest="store_command", metavar="copy", required=True)
    copy = actions.add_parser(
        "copy", help="copy every device, event, health sample, release, rollout and audit entry of one "
                     "store into a new, empty one (either backend)")
    copy.add_argument("--from", dest="source", required=True, metavar="URL",
                      help="sqlite://FILE or postgresql://USER@HOST:PORT/DATABASE")
    copy.add_argument("--to", dest="dest", required=True, metavar="URL", help="the same forms; must be empty")
    copy.add_argument("--from-password-file", type=Path, default=None, metavar="FILE",
                      help="the password of a postgresql:// --from")
    copy.add_argument("--to-password-file", type=Path, default=None, metavar="FILE",
                      help="the password of a postgresql:// --to")


def migrate(config: ServerConfig) -> str:
    """Bring the store's schema up to date (what opening it does) and return a one-line report.

    Raises:
        StoreError: the database cannot be opened or reached, or was written by a newer server.
        ServerConfigError: the store's password file cannot be read.
    """
    store: FleetStore = open_store(config.store)
    try:
        before, after = store.schema_versions
    finally:
        store.close()
    where = config.store.url
    if before == after:
        return f"fleet database {where}: schema {after}, up to date"
    return f"fleet database {where}: schema {before} -> {after}"


def store_from_url(url: str, password_file: Path | None) -> StoreConfig:
    """Read a store URL given on the command line by the rules of ``store.url``.

    Raises:
        ServerConfigError: the URL (or the password file's use) is invalid.
    """
    section: dict[str, str] = {"url": url}
    if password_file is not None:
        section["password_file"] = str(password_file)
    return parse_server_config({"store": section}, Path.cwd()).store


def copy_command(args: argparse.Namespace) -> str:
    """Run ``store copy`` and return its report: the rows copied per table.

    Raises:
        StoreError: a store cannot be opened, read or written, or the destination is not empty.
        ServerConfigError: a URL or password file is invalid.
    """
    source_config = store_from_url(args.source, args.from_password_file)
    dest_config = store_from_url(args.dest, args.to_password_file)
    source = open_store(source_config)
    try:
        dest = open_store(dest_config)
        try:
            counts = copy_store(source, dest)
        finally:
            dest.close()
    finally:
        source.close()
    rows = ", ".join(f"{table} {n}" for table, n in counts.items())
    return f"copied {source_config.url} to {dest_config.url}: {rows}"
