"""The SQLite backend of the fleet server's store: one database file, embedded, the default.

Its parts, one concern each, share the connections of :class:`.connection.SqliteConnections`:
:mod:`.schema` (tables and their upgrades), :mod:`.ingest` (registry and ingest writes, retention),
:mod:`.reads` (API, dashboard and metrics reads) with :mod:`.pages`
(the devices page as JSON text built by SQLite), :mod:`.rollouts` (the rollout runner's writes and
the rollout reads), :mod:`.feed` (what changed since the runner last looked) and :mod:`.audit` (the
audit log and recorded releases), :mod:`.copying` (whole tables out and in, for ``store copy``) and
:mod:`.notifications` (webhook deliveries).
"""

from __future__ import annotations

from pathlib import Path

from fleet_server.errors import StoreError
from fleet_server.store.sqlite.audit import SqliteAudit
from fleet_server.store.sqlite.copying import SqliteCopy
from fleet_server.store.sqlite.feed import SqliteFeed
from fleet_server.store.sqlite.ingest import SqliteIngest
from fleet_server.store.sqlite.notifications import SqliteNotifications
from fleet_server.store.sqlite.pages import SqlitePages
from fleet_server.store.sqlite.rollouts import SqliteRollouts
from fleet_server.store.sqlite.schema import SCHEMA_VERSION, create_schema

__all__ = ["SCHEMA_VERSION", "SqliteStore"]


class SqliteStore(SqliteIngest, SqlitePages, SqliteRollouts, SqliteFeed, SqliteAudit, SqliteCopy,
                  SqliteNotifications):
    """The fleet server's SQLite database (see the module docstring). Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date.

        Raises:
            StoreError: the file cannot be opened or was written by a newer server.
        """
        super().__init__(path)
        try:
            with self._writing("bring the schema up to date", begin=False):  # it begins its own
                self.schema_versions = create_schema(self._wconn, self.path)
        except StoreError:
            self.close()
            raise
