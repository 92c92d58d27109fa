"""Build the leader lock ``store.url`` calls for: the PostgreSQL advisory lock shared by replicas,
or the single SQLite process's own (which claims the store file first, refusing a second process).
"""

from __future__ import annotations

import os
import socket

from fleet_server.config import ServerConfig
from fleet_server.leadership import LeaderLock
from fleet_server.store import SqliteStore, read_password
from fleet_server.store.sqlite.owner import SqliteLeaderLock, SqliteOwner

__all__ = ["claim_sqlite_store", "leader_lock", "replica_name"]


def replica_name() -> str:
    """Return this replica's name as recorded with its term: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_sqlite_store(config: ServerConfig) -> SqliteOwner | None:
    """Claim the SQLite store file for this process (None for a PostgreSQL store).

    Raises:
        StoreError: another fleet-server process owns the file.
    """
    if config.store.backend != "sqlite":
        return None
    owner = SqliteOwner(config.store.path)
    owner.claim()
    return owner


def leader_lock(config: ServerConfig, store: object) -> LeaderLock:
    """Return the leader lock of the configured store (``store`` is the opened store, whose
    ``take_term`` the SQLite lock uses).

    Raises:
        ServerConfigError: the PostgreSQL password file cannot be read.
    """
    if isinstance(store, SqliteStore):
        return SqliteLeaderLock(store, replica_name())
    from fleet_server.store.postgres.leader import PgLeaderLock  # noqa: PLC0415 - only when configured
    password = None if config.store.password_file is None else read_password(config.store.password_file)
    return PgLeaderLock(config.store.url, password, lease=config.leader.lease, holder=replica_name())
