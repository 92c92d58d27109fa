"""The PostgreSQL store's registry and ingest writes: one transaction per ingest batch, each kind of
row written by ONE set-based statement over arrays (``INSERT ... SELECT FROM unnest(...) ON
CONFLICT``, ``UPDATE ... FROM unnest(...)``), enrolment and retention: one statement per kind of
row instead of one per row (``python -m bench.bench_store_backends`` measures it beside SQLite).

The same semantics as the SQLite store: a device row is inserted once and then updated column by
column, later messages of a batch winning; an event or health sample already stored (same device,
time and type: a redelivery of the broker) is not stored twice; counters add up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.store.postgres.connection import PgConnection, PgConnections
from fleet_server.store.records import (
    IngestBatch,
    Received,
    device_row_groups,
    device_updates,
    event_commits,
    event_rows,
    guard_of,
    health_row,
    to_json,
)

__all__ = ["PgIngest"]

log = logging.getLogger(__name__)

_PRUNE_CHUNK = 5000

_TEXT, _FLOAT, _BIGINT, _INT = "text[]", "float8[]", "int8[]", "int4[]"
_TYPES: dict[str, dict[str, str]] = {
    "devices": {"id": _TEXT, "labels": _TEXT, "profile": _TEXT, "first_seen": _FLOAT,
                "last_seen": _FLOAT, "online": _INT, "online_ts": _FLOAT, "release": _BIGINT,
                "revision": _TEXT, "sync_state": _TEXT, "paused": _INT, "pause_reason": _TEXT,
                "drift": _TEXT, "last_error": _TEXT, "status_ts": _FLOAT, "last_event": _TEXT,
                "last_event_ts": _FLOAT, "repeat_count": _INT, "repeat_last_seen": _FLOAT},
    "events": {"device": _TEXT, "ts": _FLOAT, "received_at": _FLOAT, "type": _TEXT, "commit": _TEXT,
               "release": _BIGINT, "reason": _TEXT, "step": _TEXT, "detail": _TEXT, "committed_at": _FLOAT},
    "health": {"device": _TEXT, "ts": _FLOAT, "received_at": _FLOAT, "metrics": _TEXT, "checks": _TEXT},
}
"""The array type of each column the ingest path writes, by table."""


def _arrays(table: str, columns: Sequence[str]) -> str:
    """``unnest(%s::text[], %s::float8[], ...) AS v ("a", "b", ...)`` for ``columns`` of ``table``."""
    types = _TYPES[table]
    marks = ", ".join(f"%s::{types[c]}" for c in columns)
    names = ", ".join(f'"{c}"' for c in columns)
    return f"unnest({marks}) AS v ({names})"


def _insert_or_ignore(conn: PgConnection, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each with the keys of the first) in one statement, in their order, skipping
    those a unique index already holds (a redelivered message)."""
    if not rows:
        return
    columns = list(rows[0])
    names = ", ".join(f'"{c}"' for c in columns)
    conn.execute(f"INSERT INTO {table} ({names}) SELECT * FROM {_arrays(table, columns)}"  # noqa: S608
                 " ON CONFLICT DO NOTHING", [[r[c] for r in rows] for c in columns])


class PgIngest(PgConnections):
    """Registry and ingest writes of the PostgreSQL store (see the module docstring)."""

    def apply_batch(self, batch: IngestBatch) -> None:
        """Write one batch of decoded messages in ONE transaction: upsert the devices it concerns,
        insert its events and health samples, add its counters. All or nothing. An event or
        health sample already stored (same device, time and type: a redelivery) is not stored twice.

        Raises:
            StoreError: the database cannot be written (nothing of the batch is stored).
        """
        if not len(batch) and not batch.counters:
            return
        devices = device_updates(batch)
        with self._writing("store an ingest batch") as conn:
            _write_devices(conn, devices)
            if batch.events:
                _insert_or_ignore(conn, "events", _event_rows(conn, batch.events))
            if batch.health:
                _insert_or_ignore(conn, "health", [health_row(r) for r in batch.health])
            if batch.counters:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO counters (name, value) VALUES (%s, %s) ON CONFLICT (name)"
                        " DO UPDATE SET value = counters.value + excluded.value",
                        sorted(batch.counters.items()))

    def register_device(self, device_id: str, *, labels: Mapping[str, str] | None = None,
                        profile: str | None = None, now: float | None = None) -> None:
        """Make ``device_id`` known before it ever reports (the ``unknown_devices: refuse`` policy
        accepts only known devices). Labels and profile are set only when given; the next ``status``
        from the device that carries labels or a profile replaces them (the device's report wins).

        Raises:
            StoreError: the database cannot be written.
        """
        at = time.time() if now is None else now
        with self._writing("register a device") as conn:
            conn.execute("INSERT INTO devices (id, first_seen, last_seen, registered) VALUES (%s, %s, %s, 1)"
                         " ON CONFLICT (id) DO UPDATE SET registered = 1", (device_id, at, at))
            if labels is not None:
                conn.execute("UPDATE devices SET labels = %s WHERE id = %s",
                             (to_json(dict(labels)), device_id))
            if profile is not None:
                conn.execute("UPDATE devices SET profile = %s WHERE id = %s", (profile, device_id))

    def known_device(self, device_id: str) -> bool:
        """Return True when the device has a registry row (it reported or was registered).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("look a device up") as conn:
            return conn.execute("SELECT 1 FROM devices WHERE id = %s", (device_id,)).fetchone() is not None

    def known_devices(self) -> set[str]:
        """Return the ids of every device with a registry row.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("list device ids") as conn:
            return {str(r["id"]) for r in conn.execute("SELECT id FROM devices")}

    def prune(self, now: float, events_max_age: float, health_max_age: float) -> int:
        """Delete events and health samples received longer ago than their maximum age; return how
        many rows were deleted. Deletes in chunks so that ingest is never blocked for long.

        Raises:
            StoreError: the database cannot be written.
        """
        deleted = 0
        for table, max_age in (("events", events_max_age), ("health", health_max_age)):
            cutoff = now - max_age
            while True:
                with self._writing(f"prune {table}") as conn:
                    cur = conn.execute(
                        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE received_at < %s"  # noqa: S608
                        " LIMIT %s)", (cutoff, _PRUNE_CHUNK))
                    n = cur.rowcount
                deleted += n
                if n < _PRUNE_CHUNK:
                    break
        if deleted:
            log.info("pruned %s old rows", deleted)
        return deleted


def _write_devices(conn: PgConnection, updates: Mapping[str, dict[str, Any]]) -> None:
    """Insert the devices not known yet, then update their columns, one statement per group of
    columns; a status or event update older than the stored one is skipped (its time column)."""
    if not updates:
        return
    fresh = [{"id": u["id"], "first_seen": u["first_seen"], "last_seen": u["last_seen"]}
             for u in updates.values()]
    _insert_or_ignore(conn, "devices", fresh)
    for columns, rows in device_row_groups(updates).items():
        cols = [c for c in columns if c not in ("id", "last_seen")]
        guard = guard_of(cols)
        sets = ", ".join([*(f'"{c}" = v."{c}"' for c in cols),
                          "last_seen = GREATEST(d.last_seen, v.last_seen)"])
        where = "d.id = v.id" + (f' AND (d."{guard}" IS NULL OR d."{guard}" <= v."{guard}")' if guard else "")
        conn.execute(f"UPDATE devices AS d SET {sets} FROM {_arrays('devices', columns)} WHERE {where}",  # noqa: S608
                     [[r[c] for r in rows] for c in columns])


def _event_rows(conn: PgConnection, events: Sequence[Received]) -> list[dict[str, Any]]:
    """The event rows of a batch, each with its release's commit time when the release is known."""
    commits = event_commits(events)
    known: dict[str, float] = {}
    if commits:
        for row in conn.execute('SELECT "commit", committed_at FROM releases WHERE "commit" = ANY(%s)'
                                " AND committed_at IS NOT NULL", (commits,)):
            known[row["commit"]] = row["committed_at"]
    return event_rows(events, known)
