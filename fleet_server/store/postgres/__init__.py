"""The PostgreSQL backend of the fleet server's store (``store.url: postgresql://...``), for fleets
that outgrow one SQLite file: psycopg 3 with a connection pool, batched ingest (``executemany``,
``ON CONFLICT`` upserts, one transaction per batch), the same tables and semantics as the SQLite
backend.

Its parts mirror the SQLite backend's: :mod:`.connection`, :mod:`.schema`, :mod:`.ingest`,
:mod:`.reads`, :mod:`.rollouts`, :mod:`.feed`, :mod:`.audit`, :mod:`.copying` and :mod:`.notifications`,
composed into :class:`PostgresStore`.
"""

from __future__ import annotations

from fleet_server.errors import StoreError
from fleet_server.store.postgres.audit import PgAudit
from fleet_server.store.postgres.copying import PgCopy
from fleet_server.store.postgres.feed import PgFeed
from fleet_server.store.postgres.ingest import PgIngest
from fleet_server.store.postgres.notifications import PgNotifications
from fleet_server.store.postgres.reads import PgReads
from fleet_server.store.postgres.rollouts import PgRollouts
from fleet_server.store.postgres.schema import SCHEMA_VERSION, create_schema

__all__ = ["SCHEMA_VERSION", "PostgresStore"]


class PostgresStore(PgIngest, PgReads, PgRollouts, PgFeed, PgAudit, PgCopy, PgNotifications):
    """The fleet server's PostgreSQL database (see the module docstring). Safe to share between threads."""

    def __init__(self, url: str, password: str | None = None) -> None:
        """Connect to the database at ``url`` and bring its schema up to date.

        Raises:
            StoreError: the database cannot be reached, refuses the login, or was written by a newer
                server.
        """
        super().__init__(url, password)
        try:
            with self._writing("bring the schema up to date") as conn:
                self.schema_versions = create_schema(conn, self.where)
        except StoreError:
            self.close()
            raise
