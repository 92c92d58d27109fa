"""The SQLite store's schema: the versioned migrations of ``migrations/sqlite/`` (tables, indexes,
triggers) applied when a store is opened, then the ``rollouts`` view.

Tables: ``devices`` (the registry: one row per device, the latest status, online state and event),
``events`` (history; each row keeps the commit time of its release when the release is known, so
commit-to-applied = event ts - commit time), ``health`` (samples), ``releases`` (signed releases
seen by the git watcher), ``audit`` (who did what and why), ``counters`` (ingest totals that survive
restarts) and ``meta`` (the schema version, the rollout runner's cursor and the fleet baseline).

Rollouts: ``rollout_records`` holds one row per rollout with its state but the devices (``"devices":
null``); ``rollout_devices`` one row per (rollout, device) with the device's status in that rollout
(``wave``, ``state`` as columns for paging, the whole status as JSON in ``data``). The rollout
runner writes only the devices that changed since its last write, in the same transaction as the
rollout's record. The ``rollouts`` view reads as the single table of older stores did: each
rollout's ``state`` with every device inside (assembled by SQLite when ``state`` is selected). An
older store's ``rollouts`` table is split into the two tables when the store is opened
(:func:`migrate_rollouts`).

``device_changes``: one row per device, renumbered (``seq``, ever increasing) by triggers each time
the device is inserted or its ``online``, ``release``, ``paused``, ``labels`` or ``profile``
changes. A status that changes none of them (a heartbeat) writes nothing here. The rollout runner
reads the devices changed after the last ``seq`` it saw instead of the whole registry.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from fleet_server.store.migrations import check_not_newer, latest_version, pending

__all__ = ["SCHEMA_VERSION", "create_schema", "statements"]

SCHEMA_VERSION = latest_version("sqlite")
"""The newest schema this server knows (the number of ``migrations/sqlite/*.sql`` files)."""

_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                     " name TEXT NOT NULL, applied_at REAL NOT NULL)")

_ROLLOUTS_VIEW = (
    "CREATE VIEW IF NOT EXISTS rollouts AS SELECT r.id, r.release, r.[commit], r.previous, r.plan,"
    " json_set(r.state, '$.devices', (SELECT json_group_object(d.device, json(d.data)) FROM rollout_devices d"
    " WHERE d.rollout_id = r.id)) AS state, r.phase, r.wave, r.actor, r.reason, r.created, r.updated"
    " FROM rollout_records r")


def migrate_rollouts(conn: sqlite3.Connection) -> None:
    """Bring the rollout tables up to date inside the caller's transaction: a ``rollouts`` table of
    an older store (each state with its devices inside) is split into ``rollout_records`` and one
    ``rollout_devices`` row per device, then replaced by the ``rollouts`` view, which reads as the
    table did (``state`` with its ``devices``)."""
    old = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rollouts'").fetchone()
    if old is not None:
        conn.execute(
            "INSERT OR REPLACE INTO rollout_devices (rollout_id, device, wave, state, data)"
            " SELECT r.id, j.key, json_extract(j.value, '$.wave'), json_extract(j.value, '$.state'), j.value"
            " FROM rollouts r, json_each(r.state, '$.devices') j")
        conn.execute(
            "INSERT OR REPLACE INTO rollout_records (id, release, [commit], previous, plan, state, phase,"
            " wave, actor, reason, created, updated) SELECT id, release, [commit], previous, plan,"
            " json_set(state, '$.devices', json('null')), phase, wave, actor, reason, created, updated"
            " FROM rollouts")
        conn.execute("DROP TABLE rollouts")
    conn.execute(_ROLLOUTS_VIEW)


def statements(sql: str) -> list[str]:
    """Split the text of a migration into its statements (a trigger's body stays whole)."""
    out: list[str] = []
    pending = ""
    for line in sql.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line + "\n"
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out


def _current_version(conn: sqlite3.Connection, path: Path) -> int:
    """The newest migration recorded (0 for a new store, or one from before versioned migrations);
    a ``meta`` schema above what this server knows is refused too."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is not None:
            check_not_newer("sqlite", int(row[0]), str(path))
    if "schema_migrations" not in tables:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])


def create_schema(conn: sqlite3.Connection, path: Path) -> tuple[int, int]:
    """Apply the missing migrations in one transaction, split an older store's ``rollouts`` table,
    and record the schema version; return the versions before and after.

    A store from before versioned migrations (no ``schema_migrations``) gets every migration: the
    first one is written to leave such a store as it is.

    Raises:
        StoreError: the database was written by a newer server.
        sqlite3.Error: the database cannot be written (the caller translates it).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = _current_version(conn, path)
        todo = pending("sqlite", before, str(path))
        conn.execute(_MIGRATIONS_TABLE)
        for migration in todo:
            for statement in statements(migration.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                         (migration.version, migration.name, time.time()))
        migrate_rollouts(conn)
        after = latest_version("sqlite")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(after),))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return before, after
