"""The PostgreSQL store's reads for the API, the dashboard and the metrics: the registry with its
filters, one device's history, fleet totals and the service-level aggregates (the same queries and
answers as the SQLite store's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fleet_server.store.device_order import id_prefix_range, order_by_sql
from fleet_server.store.postgres.connection import PgConnections
from fleet_server.store.records import DEVICE_COLUMNS, device_row, event_row, fleet_summary, from_json

__all__ = ["PgReads"]

_NO_LIMIT = float("-inf")


def _since(since: float | None) -> float:
    return _NO_LIMIT if since is None else since


class PgReads(PgConnections):
    """Reads of the PostgreSQL store for the API, dashboard and metrics."""

    def devices(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                online: bool | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        """Return devices (ordered by id) matching every given label, the sync state and online flag.

        Raises:
            StoreError: the database cannot be read.
        """
        where, params = _device_filter(label, sync_state, online)
        with self._reading("list devices") as conn:
            rows = conn.execute(f"SELECT * FROM devices{where} ORDER BY id LIMIT %s OFFSET %s",  # noqa: S608
                                [*params, max(0, int(limit)), max(0, int(offset))]).fetchall()
        return [device_row(r) for r in rows]

    def devices_page_json(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                          online: bool | None = None, limit: int = 100, offset: int = 0,
                          id_prefix: str | None = None, sort: str = "id", descending: bool = False) -> str:
        """Return the JSON text of one page of devices matching every filter (ids starting with
        ``id_prefix`` when given), ordered by ``sort`` (then by id), with how many match in all:
        ``{"devices": [...], "total": N, "limit": L, "offset": O}``.

        Raises:
            StoreError: the database cannot be read.
            ValueError: ``sort`` is not a sort key or ``id_prefix`` holds a character no id holds.
        """
        limit, offset = max(0, int(limit)), max(0, int(offset))
        where, params = _device_filter(label, sync_state, online)
        if id_prefix is not None:
            low, high = id_prefix_range(id_prefix)  # ids are COLLATE "C": a range of the id index
            where += (" AND " if where else " WHERE ") + "devices.id >= %s AND devices.id < %s"
            params = [*params, low, high]
        order = order_by_sql("postgresql", sort, descending)
        with self._reading("list devices") as conn:
            rows = conn.execute(f"SELECT * FROM devices{where} ORDER BY {order} LIMIT %s OFFSET %s",  # noqa: S608
                                [*params, limit, offset]).fetchall()
            total = conn.execute(f"SELECT count(*) AS n FROM devices{where}", params).fetchone()  # noqa: S608
        page = [device_row(r) for r in rows]
        return json.dumps({"devices": page, "total": 0 if total is None else int(total["n"]),
                           "limit": limit, "offset": offset})

    def count_devices(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                      online: bool | None = None) -> int:
        """Return how many devices match the same filters as :meth:`devices`.

        Raises:
            StoreError: the database cannot be read.
        """
        where, params = _device_filter(label, sync_state, online)
        with self._reading("count devices") as conn:
            row = conn.execute(f"SELECT count(*) AS n FROM devices{where}", params).fetchone()  # noqa: S608
        return 0 if row is None else int(row["n"])

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return one device's registry row, or None when it is unknown.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read a device") as conn:
            row = conn.execute("SELECT * FROM devices WHERE id = %s", (device_id,)).fetchone()
        return None if row is None else device_row(row)

    def device_events(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Return the device's most recent events, newest first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read device events") as conn:
            rows = conn.execute(
                'SELECT e.id, e.device, e.ts, e.received_at, e.type, e."commit", e.release, e.reason, e.step,'
                " e.detail, coalesce(e.committed_at, r.committed_at) AS committed_at FROM events e"
                ' LEFT JOIN releases r ON r."commit" = e."commit"'
                " WHERE e.device = %s ORDER BY e.id DESC LIMIT %s",
                (device_id, max(0, int(limit)))).fetchall()
        return [event_row(r) for r in rows]

    def device_health(self, device_id: str, since: float | None = None,
                      limit: int = 500) -> list[dict[str, Any]]:
        """Return the device's health samples (newest first), only those at or after ``since``.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read device health") as conn:
            rows = conn.execute(
                "SELECT id, device, ts, received_at, metrics, checks FROM health"
                " WHERE device = %s AND ts >= %s"
                " ORDER BY ts DESC, id DESC LIMIT %s",
                (device_id, _since(since), max(0, int(limit)))).fetchall()
        return [{**r, "metrics": from_json(r["metrics"]), "checks": from_json(r["checks"])} for r in rows]

    def summary(self) -> dict[str, Any]:
        """Return fleet totals: ``devices``, ``by_sync_state``, ``online``/``offline`` and ``releases``
        (how many devices run each release version; ``null`` for none reported).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("summarise the fleet") as conn:
            groups = conn.execute("SELECT sync_state, online, release, count(*) AS n FROM devices"
                                  " GROUP BY sync_state, online, release").fetchall()
        return fleet_summary((g["sync_state"], g["online"], g["release"], g["n"]) for g in groups)

    def counters(self) -> dict[str, int]:
        """Return the persistent ingest counters (name -> total).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read counters") as conn:
            rows = conn.execute("SELECT name, value FROM counters ORDER BY name").fetchall()
        return {r["name"]: int(r["value"]) for r in rows}

    def event_counts(self, *, since: float | None = None) -> dict[str, int]:
        """Return how many events of each type arrived at or after ``since`` (received time).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("count events") as conn:
            return {r["type"]: int(r["n"]) for r in conn.execute(
                "SELECT type, count(*) AS n FROM events WHERE received_at >= %s GROUP BY type",
                (_since(since),))}

    def commit_to_applied(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from release commit to ``sync_succeeded`` for the newest applied events whose
        release commit time is known.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read commit-to-applied times") as conn:
            return [float(r["took"]) for r in conn.execute(
                "SELECT e.ts - coalesce(e.committed_at, r.committed_at) AS took FROM events e"
                ' LEFT JOIN releases r ON r."commit" = e."commit"'
                " WHERE e.type = 'sync_succeeded' AND e.received_at >= %s"
                " AND coalesce(e.committed_at, r.committed_at) IS NOT NULL ORDER BY e.id DESC LIMIT %s",
                (_since(since), max(0, int(limit))))]

    def drift_recovery_times(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from ``drift_detected`` to the next ``drift_corrected`` on the same device.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read drift recovery times") as conn:
            return [float(r["took"]) for r in conn.execute(
                "SELECT took FROM (SELECT c.id, c.ts - (SELECT max(d.ts) FROM events d"
                " WHERE d.device = c.device"
                " AND d.type = 'drift_detected' AND d.ts <= c.ts) AS took FROM events c"
                " WHERE c.type = 'drift_corrected' AND c.received_at >= %s) x WHERE took IS NOT NULL"
                " ORDER BY id DESC LIMIT %s",
                (_since(since), max(0, int(limit))))]

    def applied_from_releases(self, *, since: float | None = None) -> tuple[int, int]:
        """Return (``sync_succeeded`` events, those whose commit is a recorded signed release).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("count applied releases") as conn:
            row = conn.execute(
                "SELECT count(*) AS n, count(r.version) AS known FROM events e"
                ' LEFT JOIN releases r ON r."commit" = e."commit"'
                " WHERE e.type = 'sync_succeeded' AND e.received_at >= %s", (_since(since),)).fetchone()
        return (0, 0) if row is None else (int(row["n"]), int(row["known"]))

    @staticmethod
    def device_columns() -> tuple[str, ...]:
        """Return the columns of a device row, in table order (for API documentation and tests)."""
        return DEVICE_COLUMNS


def _device_filter(label: Mapping[str, str] | None, sync_state: str | None,
                   online: bool | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for key, value in sorted((label or {}).items()):
        clauses.append("(devices.labels::jsonb ->> %s) = %s")
        params += [key, value]
    if sync_state is not None:
        clauses.append("sync_state = %s")
        params.append(sync_state)
    if online is not None:
        clauses.append("coalesce(online, 0) = %s")
        params.append(1 if online else 0)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
