"""Versioned schema migrations: an ordered list of SQL files per backend, shipped with the package.

``<backend>/NNNN_name.sql``, numbered from 0001 without gaps; a store records each version it
applied (table ``schema_migrations``) and applies the missing ones in order, each in the same
transaction as its record. A store whose recorded version is above the newest file this server
ships was written by a newer server: it is refused (one line), never downgraded. Why plain files
and not a migration tool: see ``docs/architecture-server.md``.

Pure apart from reading the package's own files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fleet_server.errors import StoreError

__all__ = ["BACKENDS", "Migration", "check_not_newer", "latest_version", "migrations", "pending"]

BACKENDS = ("sqlite", "postgresql")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One schema step: its version, its name (from the file name) and its SQL text."""

    version: int
    name: str
    sql: str


@cache
def migrations(backend: str) -> tuple[Migration, ...]:
    """Return the migrations of ``backend`` in order (checked: numbered 1, 2, ... without gaps).

    Raises:
        ValueError: an unknown backend, or the shipped files are misnumbered (a packaging bug).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown store backend {backend!r}")
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath(backend).iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ValueError(f"{backend} migrations are not numbered 1..{len(found)}: "
                         f"{[m.version for m in found]}")
    return tuple(found)


def latest_version(backend: str) -> int:
    """Return the newest schema version this server knows for ``backend``."""
    return len(migrations(backend))


def check_not_newer(backend: str, current: int, where: str) -> None:
    """Refuse a store at a schema version above the newest one this server knows.

    Raises:
        StoreError: ``current`` is newer; ``where`` names the database in the one-line reason.
    """
    latest = latest_version(backend)
    if current > latest:
        raise StoreError(f"fleet database {where} has schema {current}, newer than {latest}: "
                         "it was written by a newer fleet-server")


def pending(backend: str, current: int, where: str) -> tuple[Migration, ...]:
    """Return the migrations a store at version ``current`` still needs, in order.

    Raises:
        StoreError: the store's schema is newer than this server knows.
    """
    check_not_newer(backend, current, where)
    return migrations(backend)[current:]
