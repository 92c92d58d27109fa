"""The PostgreSQL store's feed for the rollout runner: what arrived since the runner last looked
(events and health samples by row id, registry changes by sequence number), the runner's cursor,
and the device snapshot it starts from.

``device_changes`` holds one row per device, given a new ``seq`` by a trigger whenever the device is
inserted or its ``online``, ``release``, ``paused``, ``labels`` or ``profile`` changes; a heartbeat
writes nothing there. Ids and ``seq`` grow in commit order because the store has one writer at a
time (see :mod:`.connection`), so "after the last one seen" misses nothing.
"""

from __future__ import annotations

from typing import Any

from fleet_server.store.postgres.connection import PgConnections
from fleet_server.store.records import device_row, event_row, from_json, registry_row

__all__ = ["PgFeed"]

_REGISTRY_COLUMNS = "d.id, d.labels, d.profile, d.online, d.paused, d.release, d.revision"


class PgFeed(PgConnections):
    """The rollout runner's change feed from the PostgreSQL store."""

    def rollout_cursor(self) -> dict[str, int] | None:
        """Return the rollout runner's read positions (``events``, ``health``), None before the
        first write.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read the rollout cursor") as conn:
            rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE %s",
                                ("rollout_cursor.%",)).fetchall()
        if not rows:
            return None
        return {str(r["key"]).split(".", 1)[1]: int(r["value"]) for r in rows}

    def history_heads(self) -> dict[str, int]:
        """Return the highest row id of ``events`` and ``health`` (0 when empty).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read history heads") as conn:
            row = conn.execute("SELECT (SELECT coalesce(max(id), 0) FROM events) AS events,"
                               " (SELECT coalesce(max(id), 0) FROM health) AS health").fetchone()
        assert row is not None
        return {"events": int(row["events"]), "health": int(row["health"])}

    def events_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return events with a row id above ``after``, oldest first (``detail`` decoded).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read new events") as conn:
            rows = conn.execute(
                'SELECT id, device, ts, received_at, type, "commit", release, reason, step, detail'
                " FROM events WHERE id > %s ORDER BY id LIMIT %s",
                (int(after), max(1, int(limit)))).fetchall()
        return [event_row(r) for r in rows]

    def health_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return health samples with a row id above ``after``, oldest first (metrics and checks decoded).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read new health samples") as conn:
            rows = conn.execute(
                "SELECT h.id, h.device, h.ts, h.metrics, h.checks, d.release FROM health h"
                " LEFT JOIN devices d ON d.id = h.device WHERE h.id > %s ORDER BY h.id LIMIT %s",
                (int(after), max(1, int(limit)))).fetchall()
        return [{**r, "metrics": from_json(r["metrics"]), "checks": from_json(r["checks"])} for r in rows]

    def device_snapshot(self) -> list[dict[str, Any]]:
        """Return every device's id, labels, profile, online and paused flags and release (by id).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read the device snapshot") as conn:
            rows = conn.execute("SELECT id, labels, profile, online, paused, release, revision FROM devices"
                                " ORDER BY id").fetchall()
        return [device_row(r) for r in rows]

    def registry_change_head(self) -> int:
        """Return the sequence number of the latest registry change (0 when none).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read the registry change head") as conn:
            row = conn.execute("SELECT coalesce(max(seq), 0) AS seq FROM device_changes").fetchone()
        return 0 if row is None else int(row["seq"])

    def registry_changes(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return the devices whose registry row changed (inserted, or online, release, paused, labels
        or profile changed) after change ``after``, oldest change first: each with ``seq`` and the
        fields :meth:`device_snapshot` returns.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read registry changes") as conn:
            rows = conn.execute(
                f"SELECT c.seq, {_REGISTRY_COLUMNS} FROM device_changes c JOIN devices d ON d.id = c.device"  # noqa: S608
                " WHERE c.seq > %s ORDER BY c.seq LIMIT %s", (int(after), max(1, int(limit)))).fetchall()
        return [registry_row(r) for r in rows]
