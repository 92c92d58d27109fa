"""The fleet server's store: the only server package that speaks SQL.

The rest of the server depends on the protocols of :mod:`.interfaces` (one per concern, and
:class:`FleetStore` for all of them), on the backend-neutral records of :mod:`.records`, and on
:func:`open_store`, which builds the backend the configuration names. Backends: :mod:`.sqlite` (one
embedded database file, WAL; the default).
"""

from __future__ import annotations

from fleet_server.store.interfaces import AuditStore, FleetStore, IngestStore, ReadStore, RolloutStore
from fleet_server.store.records import INGEST_KINDS, IngestBatch, Received, RolloutWrite, to_epoch
from fleet_server.store.sqlite import SCHEMA_VERSION, SqliteStore

__all__ = [
    "INGEST_KINDS",
    "SCHEMA_VERSION",
    "AuditStore",
    "FleetStore",
    "IngestBatch",
    "IngestStore",
    "ReadStore",
    "Received",
    "RolloutStore",
    "RolloutWrite",
    "SqliteStore",
    "Store",
    "to_epoch",
]

Store = SqliteStore
"""The default backend: ``Store(path)`` opens the SQLite database at ``path``."""
