"""The PostgreSQL store's schema: the versioned migrations of ``migrations/postgresql/`` applied when
a store is opened (or by ``fleet-server migrate``), in one transaction under an advisory lock, so
that two servers starting at once against one database do not both apply them.
"""

from __future__ import annotations

import time

from fleet_server.store.migrations import check_not_newer, latest_version, pending
from fleet_server.store.postgres.connection import PgConnection

__all__ = ["SCHEMA_VERSION", "create_schema"]

SCHEMA_VERSION = latest_version("postgresql")
"""The newest schema this server knows (the number of ``migrations/postgresql/*.sql`` files)."""

_LOCK = 0x666C656574  # "fleet": the advisory lock key of schema changes
_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                     " name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")


def _current_version(conn: PgConnection, where: str) -> int:
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS has_table,"
                       " to_regclass('meta') IS NOT NULL AS has_meta").fetchone()
    assert row is not None
    if row["has_meta"]:
        meta = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if meta is not None:
            check_not_newer("postgresql", int(meta["value"]), where)
    if not row["has_table"]:
        return 0
    found = conn.execute("SELECT coalesce(max(version), 0) AS v FROM schema_migrations").fetchone()
    return 0 if found is None else int(found["v"])


def create_schema(conn: PgConnection, where: str) -> tuple[int, int]:
    """Apply the missing migrations inside the caller's transaction and record the schema version;
    return the versions before and after.

    Raises:
        StoreError: the database was written by a newer server.
        psycopg.Error: the database cannot be written (the caller translates it).
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
    before = _current_version(conn, where)
    todo = pending("postgresql", before, where)
    conn.execute(_MIGRATIONS_TABLE)
    for migration in todo:
        conn.execute(migration.sql.encode("utf-8"))  # several statements: no parameters
        conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                     (migration.version, migration.name, time.time()))
    after = latest_version("postgresql")
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', %s)"
                 " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(after),))
    return before, after
