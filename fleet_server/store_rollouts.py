"""The store's rollout device rows and registry change feed (a part of :class:`~.store.Store`).

* ``rollout_records`` holds one row per rollout with its state but the devices (``"devices":
  null``); ``rollout_devices`` one row per (rollout, device) with the device's status in that rollout
  (``wave``, ``state`` as columns for paging, the whole status as JSON in ``data``). The rollout
  runner writes only the devices that changed since its last write, in the same transaction as the
  rollout's record. The ``rollouts`` view reads as the single table of older stores did: each
  rollout's ``state`` with every device inside (assembled by SQLite when ``state`` is selected).
  An older store's ``rollouts`` table is split into the two tables when the store is opened
  (:func:`migrate_rollouts`).
* ``device_changes``: one row per device, renumbered (``seq``, ever increasing) by triggers each time
  the device is inserted or its ``online``, ``release``, ``paused``, ``labels`` or ``profile``
  changes. A status that changes none of them (a heartbeat) writes nothing here. The runner reads
  the devices changed after the last ``seq`` it saw instead of the whole registry.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["ROLLOUT_SCHEMA", "RolloutStoreMixin", "migrate_rollouts", "rollout_device_statement"]

ROLLOUT_SCHEMA: tuple[str, ...] = (
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


def rollout_device_statement(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[Any, ...]]]:
    """Return the upsert of rollout device rows (``rollout_id, device, wave, state, data``) and its
    parameters, converted (``data`` as JSON) so the caller can run it inside its transaction with
    nothing left to convert while it holds the write lock."""
    return ("INSERT OR REPLACE INTO rollout_devices (rollout_id, device, wave, state, data)"
            " VALUES (?, ?, ?, ?, ?)",
            [(r["rollout_id"], r["device"], int(r["wave"]), r["state"],
              json.dumps(r["data"], separators=(",", ":"))) for r in rows])


_REGISTRY_COLUMNS = "d.id, d.labels, d.profile, d.online, d.paused, d.release, d.revision"


def _registry_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    labels = out.get("labels")
    out["labels"] = (json.loads(labels) if isinstance(labels, str) and labels else None) or {}
    for flag in ("online", "paused"):
        out[flag] = None if out.get(flag) is None else bool(out[flag])
    return out


class RolloutStoreMixin:
    """Rollout device rows and the registry change feed, for :class:`~.store.Store`."""

    _wconn: sqlite3.Connection

    def _reading(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def rollout_device_rows(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        """Return the stored device statuses of a rollout (device -> status as stored), by device.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read rollout devices") as conn:
            rows = conn.execute("SELECT device, data FROM rollout_devices WHERE rollout_id = ?"
                                " ORDER BY device", (rollout_id,)).fetchall()
        return {str(r[0]): json.loads(r[1]) for r in rows}

    def rollout_devices_page(self, rollout_id: str, *, wave: int | None = None, state: str | None = None,
                             offset: int = 0, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """Return ``(total, page)``: how many device rows of the rollout match ``wave`` and ``state``
        (when given) and the page of them from ``offset`` (by device id), each the stored status
        with ``device``.

        Raises:
            StateError: the database cannot be read.
        """
        where, params = "rollout_id = ?", list[Any]([rollout_id])
        if wave is not None:
            where += " AND wave = ?"
            params.append(int(wave))
        if state is not None:
            where += " AND state = ?"
            params.append(state)
        with self._reading("page rollout devices") as conn:
            total = int(conn.execute(f"SELECT count(*) FROM rollout_devices WHERE {where}",  # noqa: S608
                                     params).fetchone()[0])
            rows = conn.execute(f"SELECT device, data FROM rollout_devices WHERE {where}"  # noqa: S608
                                " ORDER BY device LIMIT ? OFFSET ?",
                                [*params, max(0, int(limit)), max(0, int(offset))]).fetchall()
        return total, [{"device": str(r[0]), **json.loads(r[1])} for r in rows]

    def rollout_exists(self, rollout_id: str) -> bool:
        """Tell whether a rollout with this id is stored (without reading its state).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("look a rollout up") as conn:
            row = conn.execute("SELECT 1 FROM rollout_records WHERE id = ?", (rollout_id,)).fetchone()
        return row is not None

    def registry_change_head(self) -> int:
        """Return the sequence number of the latest registry change (0 when none).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read the registry change head") as conn:
            return int(conn.execute("SELECT coalesce(max(seq), 0) FROM device_changes").fetchone()[0])

    def registry_changes(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return the devices whose registry row changed (inserted, or online, release, paused, labels
        or profile changed) after change ``after``, oldest change first: each with ``seq`` and the
        fields :meth:`~.store.Store.device_snapshot` returns.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read registry changes") as conn:
            rows = conn.execute(
                f"SELECT c.seq, {_REGISTRY_COLUMNS} FROM device_changes c JOIN devices d ON d.id = c.device"  # noqa: S608
                " WHERE c.seq > ? ORDER BY c.seq LIMIT ?", (int(after), max(1, int(limit)))).fetchall()
        return [_registry_row(r) for r in rows]
