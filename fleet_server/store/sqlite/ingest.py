"""The SQLite store's registry and ingest writes: one transaction per ingest batch, enrolment,
retention.

Batching is what makes SQLite fast enough (about 50k rows/s in transactions of 1000 rows against
about 5k/s for single-row upserts). An event or health sample already stored (same device, time and
type: a redelivery of the broker) is not stored twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

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
from fleet_server.store.sqlite.connection import SqliteConnections, insert_or_ignore

__all__ = ["SqliteIngest"]

log = logging.getLogger(__name__)


class SqliteIngest(SqliteConnections):
    """Registry and ingest writes of the SQLite store (see the module docstring)."""

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
        with self._writing("store an ingest batch"), self._db.atomic():
            self._write_devices(devices)
            if batch.events:
                insert_or_ignore(self._wconn, "events", self._event_rows(batch.events))
            if batch.health:
                insert_or_ignore(self._wconn, "health", [health_row(r) for r in batch.health])
            if batch.counters:
                self._wconn.executemany(
                    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name)"
                    " DO UPDATE SET value = value + excluded.value", sorted(batch.counters.items()))

    def _write_devices(self, updates: Mapping[str, dict[str, Any]]) -> None:
        """Insert the devices not known yet, then update their columns, one statement per group of
        columns; a status or event update older than the stored one is skipped (its time column)."""
        if not updates:
            return
        fresh = [{"id": u["id"], "first_seen": u["first_seen"], "last_seen": u["last_seen"]}
                 for u in updates.values()]
        insert_or_ignore(self._wconn, "devices", fresh)
        for columns, rows in device_row_groups(updates).items():
            cols = [c for c in columns if c not in ("id", "last_seen")]
            guard = guard_of(cols)
            sets = ", ".join([*(f"[{c}] = ?" for c in cols), "last_seen = max(coalesce(last_seen, 0), ?)"])
            where = "id = ?" + (f" AND ([{guard}] IS NULL OR [{guard}] <= ?)" if guard else "")
            params = [(*(r[c] for c in cols), r["last_seen"], r["id"], *((r[guard],) if guard else ()))
                      for r in rows]
            self._wconn.executemany(f"UPDATE devices SET {sets} WHERE {where}", params)  # noqa: S608

    def _event_rows(self, events: Sequence[Received]) -> list[dict[str, Any]]:
        commits = event_commits(events)
        known: dict[str, float] = {}
        for start in range(0, len(commits), 500):
            chunk = commits[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._wconn.execute(
                    f"SELECT [commit], committed_at FROM releases WHERE [commit] IN ({marks})"  # noqa: S608
                    " AND committed_at IS NOT NULL", chunk):
                known[row[0]] = row[1]
        return event_rows(events, known)

    def register_device(self, device_id: str, *, labels: Mapping[str, str] | None = None,
                        profile: str | None = None, now: float | None = None) -> None:
        """Make ``device_id`` known before it ever reports (the ``unknown_devices: refuse`` policy
        accepts only known devices). Labels and profile are set only when given; the next ``status``
        from the device that carries labels or a profile replaces them (the device's report wins).

        Raises:
            StoreError: the database cannot be written.
        """
        at = time.time() if now is None else now
        with self._writing("register a device"), self._db.atomic():
            self._wconn.execute(
                "INSERT INTO devices (id, first_seen, last_seen, registered) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (id) DO UPDATE SET registered = 1", (device_id, at, at))
            if labels is not None:
                self._wconn.execute("UPDATE devices SET labels = ? WHERE id = ?",
                                    (to_json(dict(labels)), device_id))
            if profile is not None:
                self._wconn.execute("UPDATE devices SET profile = ? WHERE id = ?", (profile, device_id))

    def known_device(self, device_id: str) -> bool:
        """Return True when the device has a registry row (it reported or was registered).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("look a device up") as conn:
            return conn.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is not None

    def known_devices(self) -> set[str]:
        """Return the ids of every device with a registry row.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("list device ids") as conn:
            return {r[0] for r in conn.execute("SELECT id FROM devices")}

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
                with self._writing(f"prune {table}"), self._db.atomic():
                    cur = self._wconn.execute(
                        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE received_at < ?"  # noqa: S608
                        " LIMIT 5000)", (cutoff,))
                    n = cur.rowcount
                deleted += n
                if n < 5000:
                    break
        if deleted:
            log.info("pruned %s old rows", deleted)
        return deleted
