"""The outbox in the state database: reports queued durably before they are sent, bounded by priority.

Ids increase, so id order is send order; a report is deleted only once the broker acknowledged it
(:mod:`edge_agent.report.outbox`). When the outbox is over its cap, health reports go first, then
old status reports, then events; outcomes are never dropped, and what was dropped is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from edge_agent.state_db import Database, now_or
from edge_core.errors import StateError

__all__ = ["OUTBOX_CLASSES", "OutboxItem", "OutboxTables"]

log = logging.getLogger(__name__)

OUTBOX_CLASSES = ("outcome", "event", "status", "health")
"""Outbox message classes; when the outbox is full, health goes first, then old status, then events."""

_DROPPED_KEY = "outbox.dropped."


@dataclass(frozen=True)
class OutboxItem:
    """One report waiting to be published; ``id`` order is send order."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    cls: str
    created_at: float



class OutboxTables(Database):
    """The outbox's part of the state database (the ``outbox`` table and its drop counters)."""

    def outbox_put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        cls: str,
        now: float | None = None,
    ) -> int:
        """Queue one report and return its id (ids increase: id order is send order).

        When the outbox then holds more than ``max_outbox`` items, the oldest ``health`` items are
        dropped first, then ``status`` items that are not the newest of their topic, then the
        oldest ``event`` items. ``outcome`` items are never dropped: outcomes alone may exceed the
        cap (a warning is logged). What was dropped is logged and counted (:meth:`outbox_dropped`);
        the new item itself may be the one dropped when it has the lowest priority.

        Raises:
            StateError: unknown ``cls`` or ``qos``, or the database cannot be written.
        """
        if cls not in OUTBOX_CLASSES:
            raise StateError(f"unknown outbox class {cls!r}")
        if qos not in (0, 1, 2):
            raise StateError(f"invalid MQTT QoS {qos!r}")
        with self._write("queue a report"):
            cur = self._conn.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, cls, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (topic, bytes(payload), qos, int(bool(retain)), cls, now_or(now)),
            )
            new_id = int(cur.lastrowid or 0)
            excess = int(self._one("SELECT count(*) FROM outbox")[0]) - self.max_outbox
            if excess > 0:
                self._trim_outbox(excess)
        return new_id

    def _trim_outbox(self, excess: int) -> None:
        """Drop ``excess`` items by the priority rules; runs inside the caller's write transaction."""
        candidates = (
            ("health", "SELECT id FROM outbox WHERE cls = 'health' ORDER BY id LIMIT ?"),
            (
                "status",
                "SELECT o.id FROM outbox o WHERE o.cls = 'status' AND o.id < (SELECT max(n.id) FROM outbox n"
                " WHERE n.cls = 'status' AND n.topic = o.topic) ORDER BY o.id LIMIT ?",
            ),
            ("event", "SELECT id FROM outbox WHERE cls = 'event' ORDER BY id LIMIT ?"),
        )
        dropped: dict[str, int] = {}
        for cls, sql in candidates:
            if excess <= 0:
                break
            ids = [int(r[0]) for r in self._conn.execute(sql, (excess,)).fetchall()]
            if ids:
                self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
                dropped[cls] = len(ids)
                excess -= len(ids)
        for cls, n in dropped.items():
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
                " SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT)",
                (_DROPPED_KEY + cls, str(n), n),
            )
        if dropped:
            log.warning("outbox over its cap of %s: dropped %s", self.max_outbox, dropped)
        if excess > 0:
            log.warning(
                "outbox holds %s items over its cap of %s that may not be dropped", excess, self.max_outbox
            )

    def outbox_peek(self, limit: int) -> list[OutboxItem]:
        """Return up to ``limit`` queued reports, oldest (first to send) first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read the outbox"):
            rows = self._conn.execute(
                "SELECT id, topic, payload, qos, retain, cls, created_at FROM outbox ORDER BY id LIMIT ?",
                (int(limit),),
            ).fetchall()
        return [
            OutboxItem(int(i), topic, bytes(p), int(q), bool(r), cls, float(at))
            for i, topic, p, q, r, cls, at in rows
        ]

    def outbox_delete(self, ids: Iterable[int]) -> int:
        """Remove the reports the broker acknowledged; return how many were removed.

        Raises:
            StateError: the database cannot be written.
        """
        id_list = [(int(i),) for i in ids]
        if not id_list:
            return 0
        with self._write("delete sent reports"):
            before = self._conn.total_changes
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", id_list)
            return int(self._conn.total_changes - before)

    def outbox_count(self) -> int:
        """Return how many reports are queued.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("count the outbox"):
            return int(self._one("SELECT count(*) FROM outbox")[0])

    def outbox_dropped(self) -> dict[str, int]:
        """Return how many reports of each class were dropped because the outbox was full.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read outbox counters"):
            rows = self._conn.execute(
                "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
                (_DROPPED_KEY, _DROPPED_KEY + "\uffff"),
            ).fetchall()
        return {str(k)[len(_DROPPED_KEY) :]: int(v) for k, v in rows}
