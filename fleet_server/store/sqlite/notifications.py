"""The SQLite store's webhook deliveries: the enqueue (one insert), the due deliveries, the outcome of
each attempt, the delivery log, and the notifier's read position in the event history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet_server.store.notification_records import NewDelivery
from fleet_server.store.sqlite.connection import SqliteConnections

__all__ = ["SqliteNotifications"]

_CURSOR_KEY = "notify_events_cursor"
_COLUMNS = ("id, event_id, receiver, event, body, created, state, attempts, next_attempt, last_attempt,"
            " last_status, last_error, delivered_at")


class SqliteNotifications(SqliteConnections):
    """Webhook deliveries of the SQLite store."""

    def enqueue_deliveries(self, rows: Sequence[NewDelivery]) -> int:
        """Store ``rows`` as pending deliveries due now, in one transaction; a (receiver, event id)
        already stored is skipped. Return how many were added.

        Raises:
            StoreError: the database cannot be written.
        """
        if not rows:
            return 0
        with self._writing("enqueue notifications"), self._wconn:
            before = self._wconn.total_changes
            self._wconn.executemany(
                "INSERT OR IGNORE INTO notifications (event_id, receiver, event, body, created, state,"
                " attempts, next_attempt) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?)",
                [(r.event_id, r.receiver, r.event, r.body, r.created, r.created) for r in rows])
            return self._wconn.total_changes - before

    def due_deliveries(self, now: float, limit: int = 50) -> list[dict[str, Any]]:
        """Return pending deliveries due at or before ``now``, the longest due first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read due notifications") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM notifications"  # noqa: S608 - fixed text
                                " WHERE state = 'pending' AND next_attempt <= ? ORDER BY next_attempt, id"
                                " LIMIT ?", (now, max(1, int(limit)))).fetchall()
        return [dict(r) for r in rows]

    def record_attempt(self, delivery_id: int, *, at: float, state: str, status: int | None,
                       error: str | None, next_attempt: float) -> None:
        """Record one delivery attempt: its time, the HTTP status (None: no answer), the error (None
        on success), the new state and when to try next.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("record a notification attempt"), self._wconn:
            self._wconn.execute(
                "UPDATE notifications SET attempts = attempts + 1, last_attempt = ?, last_status = ?,"
                " last_error = ?, state = ?, next_attempt = ?,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END WHERE id = ?",
                (at, status, error, state, next_attempt, state, at, int(delivery_id)))

    def deliveries_page(self, *, state: str | None = None, offset: int = 0,
                        limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """Return ``(total, page)``: how many deliveries are in ``state`` (all when None) and the page of
        them from ``offset``, newest first (without their bodies).

        Raises:
            StoreError: the database cannot be read.
        """
        where, args = ("WHERE state = ?", [state]) if state is not None else ("", [])
        with self._reading("read notifications") as conn:
            total = int(conn.execute(f"SELECT count(*) FROM notifications {where}", args).fetchone()[0])  # noqa: S608
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM notifications {where} ORDER BY id DESC LIMIT ? OFFSET ?",  # noqa: S608
                [*args, max(0, int(limit)), max(0, int(offset))]).fetchall()
        return total, [{k: r[k] for k in r.keys() if k != "body"} for r in rows]  # noqa: SIM118

    def delivery_counts(self) -> dict[str, int]:
        """Return how many deliveries are in each state.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("count notifications") as conn:
            rows = conn.execute("SELECT state, count(*) FROM notifications GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def notify_cursor(self) -> int | None:
        """Return the id of the last event the notifier looked at, None before its first look.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read the notifier's cursor") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_CURSOR_KEY,)).fetchone()
        return None if row is None else int(row[0])

    def set_notify_cursor(self, after: int) -> None:
        """Store the id of the last event the notifier looked at.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("store the notifier's cursor"), self._wconn:
            self._wconn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                (_CURSOR_KEY, str(int(after))))

    def offline_devices(self, before: float, since: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Return the devices offline since a time at or after ``since`` and before ``before`` (``id``,
        ``online_ts``, ``last_seen``), the longest offline first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read offline devices") as conn:
            rows = conn.execute("SELECT id, online_ts, last_seen FROM devices WHERE online = 0"
                                " AND online_ts >= ? AND online_ts < ? ORDER BY online_ts LIMIT ?",
                                (since, before, max(1, int(limit)))).fetchall()
        return [dict(r) for r in rows]

    def prune_deliveries(self, before: float) -> int:
        """Delete delivered and failed deliveries whose event is older than ``before``; return how many.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("prune notifications"), self._wconn:
            cur = self._wconn.execute("DELETE FROM notifications WHERE state != 'pending' AND created < ?",
                                      (before,))
            return max(0, cur.rowcount)

    def postpone_receiver(self, receiver: str, now: float, until: float) -> int:
        """Move every pending delivery of ``receiver`` due at ``now`` to ``until`` (after it failed, its
        other deliveries wait for its back-off instead of each failing in turn); return how many.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("postpone notifications"), self._wconn:
            cur = self._wconn.execute(
                "UPDATE notifications SET next_attempt = ? WHERE receiver = ? AND state = 'pending'"
                " AND next_attempt <= ?", (until, receiver, now))
            return max(0, cur.rowcount)
