"""The fleet server's store: the only server package that speaks SQL.

The rest of the server depends on the protocols of :mod:`.interfaces` (one per concern, and
:class:`FleetStore` for all of them), on the backend-neutral records of :mod:`.records`, and on
:func:`open_store`, which builds the backend ``store.url`` names: :mod:`.sqlite` (one embedded
database file, WAL; the default) or :mod:`.postgres` (PostgreSQL through psycopg 3, imported only
when configured, from the ``postgres`` extra). Both apply the versioned migrations of
:mod:`.migrations` when opened.
"""

from __future__ import annotations

from pathlib import Path

from fleet_server.config import StoreConfig
from fleet_server.errors import ServerConfigError
from fleet_server.store.interfaces import (
    AuditStore,
    FleetStore,
    IngestStore,
    NotificationStore,
    ReadStore,
    RolloutStore,
)
from fleet_server.store.notification_records import DELIVERY_STATES, NewDelivery
from fleet_server.store.records import INGEST_KINDS, IngestBatch, Received, RolloutWrite, to_epoch
from fleet_server.store.sqlite import SCHEMA_VERSION, SqliteStore

__all__ = [
    "DELIVERY_STATES",
    "INGEST_KINDS",
    "SCHEMA_VERSION",
    "AuditStore",
    "FleetStore",
    "IngestBatch",
    "IngestStore",
    "NewDelivery",
    "NotificationStore",
    "ReadStore",
    "Received",
    "RolloutStore",
    "RolloutWrite",
    "SqliteStore",
    "Store",
    "open_store",
    "read_password",
    "to_epoch",
]

_MAX_PASSWORD_BYTES = 4096

Store = SqliteStore
"""The default backend: ``Store(path)`` opens the SQLite database at ``path``."""


def read_password(path: Path) -> str:
    """Return the password in ``path`` (its first line, without the line break).

    Raises:
        ServerConfigError: the file cannot be read, is empty or is over 4 KiB.
    """
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise ServerConfigError(f"cannot read store.password_file {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_PASSWORD_BYTES:
        raise ServerConfigError(f"store.password_file {path}: over {_MAX_PASSWORD_BYTES} bytes")
    password = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not password:
        raise ServerConfigError(f"store.password_file {path}: empty")
    return password


def open_store(config: StoreConfig) -> FleetStore:
    """Open the store ``config.url`` names, applying the schema migrations it still needs.

    Raises:
        StoreError: the database cannot be opened or reached, or was written by a newer server.
        ServerConfigError: the password file cannot be read, or the ``postgres`` extra is missing.
    """
    if config.backend == "sqlite":
        return SqliteStore(config.path)
    try:
        from fleet_server.store.postgres import PostgresStore  # noqa: PLC0415 - only when configured
    except ImportError as exc:
        raise ServerConfigError("store.url: a postgresql:// store needs the postgres extra "
                                f"(pip install 'edge-fleet[postgres]'): {exc}") from exc
    password = None if config.password_file is None else read_password(config.password_file)
    return PostgresStore(config.url, password)
