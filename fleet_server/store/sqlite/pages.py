"""The SQLite store's devices page as JSON text built by SQLite (a part of :class:`.SqliteStore`).

``GET /api/v1/devices`` is read while ingest and the rollout runner keep the interpreter busy. Built
in Python, a page of 100 devices costs about 2,000 values decoded, converted and encoded again, each
step waiting for the interpreter lock behind those threads. Here ONE SQL statement returns the whole
answer (``{"devices": [...], "total": N, "limit": L, "offset": O}``) as text: the page by the id
index, the matching total, and every row turned into a JSON object by SQLite, during which the
``sqlite3`` module releases the interpreter lock. The route returns that text as it is.

The text says what :meth:`.SqliteReads.devices` returns, as the JSON encoder would write it:
``labels`` an object (``{}`` when unset or unreadable), ``drift`` the stored JSON value (``null``
when unset or unreadable), ``online``, ``paused`` and ``registered`` booleans or ``null``, and the
timestamps printed with 17 significant digits (SQLite's own JSON rendering of a REAL keeps 15, 10 µs
at today's epoch seconds): the text may differ from the shortest form in its last digit
(``1796444526.1919999`` for ``1796444526.192``) but reads back as the same number.
"""

from __future__ import annotations

from collections.abc import Mapping

from fleet_server.store.device_order import id_prefix_range, order_by_sql
from fleet_server.store.records import DEVICE_COLUMNS
from fleet_server.store.sqlite.reads import SqliteReads

__all__ = ["SqlitePages", "device_json_sql"]

_TEXT = ("id", "profile", "revision", "sync_state", "pause_reason", "last_error", "last_event")
_REAL = ("first_seen", "last_seen", "online_ts", "status_ts", "last_event_ts", "repeat_last_seen")
_FLAGS = ("online", "paused", "registered")


def _value_sql(column: str) -> str:
    if column in _TEXT:
        return f"devices.{column}"
    if column in ("release", "repeat_count"):
        return f"devices.{column}"
    if column in _REAL:
        # 17 significant digits read back as the same double ("!": SQLite's printf stops at 16
        # without it); a whole number keeps its ".0", so it reads back as a float too
        return (f"json(CASE WHEN devices.{column} IS NULL THEN NULL"
                f" ELSE printf('%!.17g', devices.{column}) END)")
    if column in _FLAGS:
        return (f"json(CASE WHEN devices.{column} IS NULL THEN NULL WHEN devices.{column} THEN 'true'"
                " ELSE 'false' END)")
    if column == "labels":
        return ("json(CASE WHEN json_valid(devices.labels) AND json_type(devices.labels) = 'object'"
                " THEN devices.labels ELSE '{}' END)")
    if column == "drift":
        return "json(CASE WHEN json_valid(devices.drift) THEN devices.drift ELSE NULL END)"
    raise ValueError(f"unknown device column {column!r}")


def device_json_sql() -> str:
    """Return the SQL expression that renders one ``devices`` row as a JSON object with
    the fields and values :meth:`.SqliteReads.devices` returns, in the same order."""
    return "json_object(" + ", ".join(f"'{c}', {_value_sql(c)}" for c in DEVICE_COLUMNS) + ")"


_DEVICE_JSON = device_json_sql()


class SqlitePages(SqliteReads):
    """The registry reads with ``devices_page_json``: the whole devices page from one statement."""

    def devices_page_json(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                          online: bool | None = None, limit: int = 100, offset: int = 0,
                          id_prefix: str | None = None, sort: str = "id", descending: bool = False) -> str:
        """Return the JSON text of one page of devices matching every filter (ids starting with
        ``id_prefix`` when given), ordered by ``sort`` (one of :data:`.DEVICE_SORTS`, then by id), with
        how many match in all: ``{"devices": [...], "total": N, "limit": L, "offset": O}``, each device
        as :meth:`.SqliteReads.devices` returns it.

        Raises:
            StoreError: the database cannot be read.
            ValueError: ``sort`` is not a sort key or ``id_prefix`` holds a character no id holds.
        """
        where, params = self._device_filter(label, sync_state, online)
        if id_prefix is not None:
            low, high = id_prefix_range(id_prefix)  # a range of the id index, not a scan
            where += (" AND " if where else " WHERE ") + "devices.id >= ? AND devices.id < ?"
            params = [*params, low, high]
        order = order_by_sql("sqlite", sort, descending)
        limit, offset = max(0, int(limit)), max(0, int(offset))
        page_params = [*params, limit, offset]
        if sort == "id":  # the id index gives the page in order: only its rows are rendered
            rows = f"SELECT {_DEVICE_JSON} AS doc FROM devices{where} ORDER BY {order} LIMIT ? OFFSET ?"  # noqa: S608
        else:
            # any other order sorts the matching rows: find the page's rows by their sort keys alone,
            # then render only those (rendering while sorting renders nearly every row of a fleet
            # whose sort key is mostly one value, seconds at 100,000 devices)
            rows = (f"SELECT {_DEVICE_JSON} AS doc FROM devices WHERE devices.rowid IN"  # noqa: S608
                    f" (SELECT devices.rowid FROM devices{where} ORDER BY {order} LIMIT ? OFFSET ?)"
                    f" ORDER BY {order}")
        # the filter and the order are built from fixed clauses, every value is a parameter
        sql = (f"SELECT json_object('devices', (SELECT json_group_array(json(p.doc)) FROM ({rows}) p),"  # noqa: S608
               f" 'total', (SELECT count(*) FROM devices{where}), 'limit', ?, 'offset', ?)")
        with self._reading("list devices") as conn:
            row = conn.execute(sql, [*page_params, *params, limit, offset]).fetchone()
        return str(row[0])
