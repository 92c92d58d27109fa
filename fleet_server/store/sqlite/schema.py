"""The SQLite store's schema: the tables, indexes, triggers and the ``rollouts`` view, created or
brought up to date when a store is opened.

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
from pathlib import Path

from fleet_server.errors import StoreError

__all__ = ["SCHEMA_VERSION", "create_schema"]

SCHEMA_VERSION = 1

_ROLLOUT_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS rollout_records (id TEXT PRIMARY KEY, release INTEGER NOT NULL,"
    " [commit] TEXT NOT NULL, previous INTEGER, plan TEXT NOT NULL, state TEXT NOT NULL,"
    " phase TEXT NOT NULL, wave INTEGER NOT NULL,"
    " actor TEXT, reason TEXT, created REAL NOT NULL, updated REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS rollout_records_by_created ON rollout_records (created)",
    "CREATE TABLE IF NOT EXISTS rollout_devices (rollout_id TEXT NOT NULL, device TEXT NOT NULL,"
    " wave INTEGER NOT NULL, state TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (rollout_id, device))"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS rollout_devices_by_state ON rollout_devices (rollout_id, state, device)",
    "CREATE INDEX IF NOT EXISTS rollout_devices_by_wave ON rollout_devices (rollout_id, wave, device)",
    "CREATE TABLE IF NOT EXISTS device_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " device TEXT NOT NULL UNIQUE)",
    "CREATE TRIGGER IF NOT EXISTS devices_changed_on_insert AFTER INSERT ON devices"
    " BEGIN INSERT OR REPLACE INTO device_changes (device) VALUES (NEW.id); END",
    "CREATE TRIGGER IF NOT EXISTS devices_changed_on_update"
    " AFTER UPDATE OF online, release, paused, labels, profile ON devices"
    " WHEN OLD.online IS NOT NEW.online OR OLD.release IS NOT NEW.release OR OLD.paused IS NOT NEW.paused"
    " OR OLD.labels IS NOT NEW.labels OR OLD.profile IS NOT NEW.profile"
    " BEGIN INSERT OR REPLACE INTO device_changes (device) VALUES (NEW.id); END",
)

_ROLLOUTS_VIEW = (
    "CREATE VIEW IF NOT EXISTS rollouts AS SELECT r.id, r.release, r.[commit], r.previous, r.plan,"
    " json_set(r.state, '$.devices', (SELECT json_group_object(d.device, json(d.data)) FROM rollout_devices d"
    " WHERE d.rollout_id = r.id)) AS state, r.phase, r.wave, r.actor, r.reason, r.created, r.updated"
    " FROM rollout_records r")


_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, labels TEXT, profile TEXT,"
    " first_seen REAL, last_seen REAL, online INTEGER, online_ts REAL,"
    " release INTEGER, revision TEXT, sync_state TEXT, paused INTEGER, pause_reason TEXT, drift TEXT,"
    " last_error TEXT, status_ts REAL, last_event TEXT, last_event_ts REAL, registered INTEGER)",
    "CREATE INDEX IF NOT EXISTS devices_by_state ON devices (sync_state)",
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, device TEXT NOT NULL, ts REAL NOT NULL,"
    " received_at REAL NOT NULL, type TEXT NOT NULL, [commit] TEXT, release INTEGER, reason TEXT,"
    " step TEXT, detail TEXT, committed_at REAL)",
    "CREATE INDEX IF NOT EXISTS events_by_device ON events (device, id)",
    "CREATE INDEX IF NOT EXISTS events_by_type ON events (type, ts)",
    "CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events (device, ts, type)",
    "CREATE INDEX IF NOT EXISTS events_by_received ON events (received_at)",
    "CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, device TEXT NOT NULL, ts REAL NOT NULL,"
    " received_at REAL NOT NULL, metrics TEXT, checks TEXT)",
    "CREATE UNIQUE INDEX IF NOT EXISTS health_once ON health (device, ts)",
    "CREATE INDEX IF NOT EXISTS health_by_received ON health (received_at)",
    "CREATE TABLE IF NOT EXISTS releases (version INTEGER PRIMARY KEY, [commit] TEXT NOT NULL,"
    " signers TEXT NOT NULL, seen_at REAL NOT NULL, committed_at REAL)",
    "CREATE INDEX IF NOT EXISTS releases_by_commit ON releases ([commit])",
    "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL,"
    " action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rollout_assignments (device TEXT PRIMARY KEY, rollout_id TEXT NOT NULL,"
    " release INTEGER NOT NULL, [commit] TEXT NOT NULL, assigned_at REAL NOT NULL, published_at REAL)",
    "CREATE TABLE IF NOT EXISTS rollout_gates (id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL,"
    " wave INTEGER NOT NULL, at REAL NOT NULL, passed INTEGER NOT NULL, detail TEXT)",
    "CREATE INDEX IF NOT EXISTS rollout_gates_by_rollout ON rollout_gates (rollout_id, id)",
    "CREATE TABLE IF NOT EXISTS rollout_samples (rollout_id TEXT NOT NULL, wave INTEGER NOT NULL,"
    " ts REAL NOT NULL, done INTEGER NOT NULL, failed INTEGER NOT NULL,"
    " pending INTEGER NOT NULL, offline INTEGER NOT NULL,"
    " deferred INTEGER NOT NULL, skipped INTEGER NOT NULL, PRIMARY KEY (rollout_id, wave, ts))",
    "CREATE INDEX IF NOT EXISTS audit_by_target ON audit (target, id)",
    *_ROLLOUT_SCHEMA,
    # covers summary(): one scan of a narrow index instead of four scans of the table
    "CREATE INDEX IF NOT EXISTS devices_by_summary ON devices (sync_state, online, release)",
)


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


def create_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables or bring them up to date, in one transaction, and record the schema version.

    Raises:
        StoreError: the database was written by a newer server.
        sqlite3.Error: the database cannot be written (the caller translates it).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        migrate_rollouts(conn)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"fleet database {path} has schema {row[0]}, newer than {SCHEMA_VERSION}")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
