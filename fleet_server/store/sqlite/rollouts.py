"""The SQLite store's rollouts: the runner's one-transaction writes, the fleet baseline, rollout
rows, gate decisions, progress samples, device rows one page at a time, and ``desired``
assignments with their publication.

The ``rollouts`` view assembles each rollout's ``state`` with every device inside from
``rollout_records`` and ``rollout_devices`` (see :mod:`fleet_server.store.sqlite.schema`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fleet_server.store.records import RolloutWrite, from_json, to_json
from fleet_server.store.sqlite.connection import SqliteConnections

__all__ = ["SqliteRollouts"]


_ROLLOUT_SUMMARY = "id, release, [commit], previous, phase, wave, actor, reason, created, updated"
_ROLLOUT_UPSERT = (
    "INSERT INTO rollout_records (id, release, [commit], previous, plan, state, phase, wave,"
    " actor, reason, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET state = excluded.state, phase = excluded.phase,"
    " wave = excluded.wave, updated = excluded.updated")


class SqliteRollouts(SqliteConnections):
    """Rollout rows, assignments and the fleet baseline of the SQLite store."""

    def write_rollouts(self, write: RolloutWrite) -> None:
        """Write the rollout runner's step results in ONE transaction: rollout states, their audit
        entries, gate decisions, new (unpublished) assignments, progress samples and the read cursor.

        Raises:
            StoreError: the database cannot be written (nothing is stored).
        """
        # Every row is converted before the write lock is taken: the ingest writer waits for that lock,
        # and converting the rows of a 50,000-device wave start inside it held ingest up for seconds.
        statements: list[tuple[str, list[tuple[Any, ...]]]] = [(_ROLLOUT_UPSERT, [
            (row["id"], int(row["release"]), row["commit"], row.get("previous"), to_json(row["plan"]),
             to_json(row["state"]), row["phase"], int(row["wave"]), row.get("actor"), row.get("reason"),
             row["created"], row["updated"]) for row in write.rollouts])]
        statements.append((
            "INSERT INTO audit (at, actor, action, target, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
            [(a["at"], a["actor"], a["action"], a["target"], a["reason"],
              to_json(dict(a["detail"])) if a.get("detail") else None) for a in write.audit]))
        statements.append((
            "INSERT INTO rollout_gates (rollout_id, wave, at, passed, detail) VALUES (?, ?, ?, ?, ?)",
            [(g["rollout_id"], g["wave"], g["at"], 1 if g["passed"] else 0, to_json(g.get("detail")))
             for g in write.gates]))
        statements.append((
            "INSERT OR REPLACE INTO rollout_assignments (device, rollout_id, release, [commit],"
            " assigned_at, published_at) VALUES (?, ?, ?, ?, ?, NULL)",
            [(a["device"], a["rollout_id"], int(a["release"]), a["commit"], a["assigned_at"])
             for a in write.assignments]))
        statements.append((
            "INSERT OR REPLACE INTO rollout_samples (rollout_id, wave, ts, done, failed, pending,"
            " offline, deferred, skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(s["rollout_id"], s["wave"], s["ts"], s["done"], s["failed"], s["pending"], s["offline"],
              s["deferred"], s["skipped"]) for s in write.samples]))
        statements.append((
            "INSERT OR REPLACE INTO rollout_devices (rollout_id, device, wave, state, data)"
            " VALUES (?, ?, ?, ?, ?)",
            [(r["rollout_id"], r["device"], int(r["wave"]), r["state"],
              json.dumps(r["data"], separators=(",", ":"))) for r in write.devices]))
        if write.cursor is not None:
            cursor = sorted(write.cursor.items())
            statements.append(("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                               [(f"rollout_cursor.{k}", str(int(v))) for k, v in cursor]))
        with self._writing("store rollout state"), self._db.atomic():
            self._check_term()
            for sql, params in statements:
                if params:
                    self._wconn.executemany(sql, params)

    def fleet_baseline(self) -> tuple[int, str] | None:
        """Return the stored fleet baseline ``(release, commit)``, None before the first one.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read the fleet baseline") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'fleet_baseline'").fetchone()
        if row is None:
            return None
        doc = from_json(row[0])
        if not isinstance(doc, dict) or not isinstance(doc.get("release"), int) \
                or not isinstance(doc.get("commit"), str):
            return None
        return int(doc["release"]), str(doc["commit"])

    def set_fleet_baseline(self, release: int, commit: str) -> None:
        """Store the fleet baseline (the last-good release devices without an assignment run).

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("store the fleet baseline"), self._db.atomic():
            self._check_term()
            self._wconn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fleet_baseline', ?)",
                                (to_json({"release": int(release), "commit": commit}),))

    def rollout_rows(self, *, phases: Sequence[str] | None = None, limit: int = 100,
                     with_state: bool = True) -> list[dict[str, Any]]:
        """Return rollouts newest first, with their state decoded (unless ``with_state`` is False: then
        as :meth:`rollout_summaries` returns them); only the given phases when set.

        Raises:
            StoreError: the database cannot be read.
        """
        where, params = "", []
        if phases is not None:
            where = f" WHERE phase IN ({','.join('?' * len(phases))})"
            params = list(phases)
        columns = "*" if with_state else _ROLLOUT_SUMMARY
        with self._reading("read rollouts") as conn:
            rows = conn.execute(f"SELECT {columns} FROM rollouts{where} ORDER BY created DESC, id DESC"  # noqa: S608
                                " LIMIT ?", [*params, max(0, int(limit))]).fetchall()
        if not with_state:
            return [dict(r) for r in rows]
        return [{**dict(r), "plan": from_json(r["plan"]), "state": from_json(r["state"])} for r in rows]

    def rollout_summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return rollouts newest first without their state (id, releases, phase, wave, who, when).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("list rollouts") as conn:
            rows = conn.execute(f"SELECT {_ROLLOUT_SUMMARY} FROM rollouts ORDER BY created DESC, id DESC"  # noqa: S608
                                " LIMIT ?", (max(0, int(limit)),)).fetchall()
        return [dict(r) for r in rows]

    def rollout_row(self, rollout_id: str) -> dict[str, Any] | None:
        """Return one rollout with its plan and state decoded, or None.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read a rollout") as conn:
            row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "plan": from_json(row["plan"]), "state": from_json(row["state"])}

    def rollout_gates(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """Return a rollout's gate decisions, oldest first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read gate decisions") as conn:
            rows = conn.execute("SELECT wave, at, passed, detail FROM rollout_gates WHERE rollout_id = ?"
                                " ORDER BY id LIMIT ?", (rollout_id, max(0, int(limit)))).fetchall()
        return [{**dict(r), "passed": bool(r["passed"]), "detail": from_json(r["detail"])} for r in rows]

    def rollout_samples(self, rollout_id: str, limit: int = 5000) -> list[dict[str, Any]]:
        """Return a rollout's wave progress samples, oldest first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read rollout samples") as conn:
            rows = conn.execute("SELECT * FROM rollout_samples WHERE rollout_id = ?"
                                " ORDER BY ts, wave LIMIT ?", (rollout_id, max(0, int(limit)))).fetchall()
        return [dict(r) for r in rows]

    def latest_rollout_samples(self, rollout_id: str) -> list[dict[str, Any]]:
        """Return a rollout's newest progress sample of every wave, by wave.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read rollout progress") as conn:
            rows = conn.execute(
                "SELECT s.* FROM rollout_samples s WHERE s.rollout_id = ? AND s.ts = (SELECT max(t.ts)"
                " FROM rollout_samples t WHERE t.rollout_id = s.rollout_id AND t.wave = s.wave)"
                " ORDER BY s.wave",
                (rollout_id,)).fetchall()
        return [dict(r) for r in rows]

    def rollout_audit(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """Return a rollout's audit entries, oldest first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read a rollout's audit log") as conn:
            rows = conn.execute("SELECT * FROM audit WHERE target = ? ORDER BY id LIMIT ?",
                                (f"rollout/{rollout_id}", max(0, int(limit)))).fetchall()
        return [{**dict(r), "detail": from_json(r["detail"])} for r in rows]

    def rollout_device_rows(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        """Return the stored device statuses of a rollout (device -> status as stored), by device.

        Raises:
            StoreError: the database cannot be read.
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
            StoreError: the database cannot be read.
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

    def rollout_supersessions(self, rollout_ids: Sequence[str]) -> dict[str, tuple[str, float | None]]:
        """Return ``{rollout id: (superseded_by, superseded_at)}`` for those of ``rollout_ids`` a newer
        rollout superseded (read from the records, without their devices).

        Raises:
            StoreError: the database cannot be read.
        """
        if not rollout_ids:
            return {}
        with self._reading("read rollout supersessions") as conn:
            rows = conn.execute(
                "SELECT id, json_extract(state, '$.superseded_by') AS by,"
                " json_extract(state, '$.superseded_at') AS at FROM rollout_records"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(rollout_ids)),)).fetchall()
        return {str(r["id"]): (str(r["by"]), None if r["at"] is None else float(r["at"]))
                for r in rows if r["by"]}

    def rollout_exists(self, rollout_id: str) -> bool:
        """Tell whether a rollout with this id is stored (without reading its state).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("look a rollout up") as conn:
            row = conn.execute("SELECT 1 FROM rollout_records WHERE id = ?", (rollout_id,)).fetchone()
        return row is not None

    def assignments(self, *, unpublished: bool = False) -> list[dict[str, Any]]:
        """Return the current ``desired`` assignment of every assigned device (only the unpublished ones
        when asked), ordered by device.

        Raises:
            StoreError: the database cannot be read.
        """
        where = " WHERE published_at IS NULL" if unpublished else ""
        with self._reading("read assignments") as conn:
            rows = conn.execute(f"SELECT * FROM rollout_assignments{where} ORDER BY device").fetchall()  # noqa: S608
        return [dict(r) for r in rows]

    def mark_published(self, published: Sequence[tuple[str, int, str]], at: float) -> None:
        """Mark the assignments ``(device, release, rollout_id)`` as published at ``at`` (rows replaced by
        a newer assignment since are left alone).

        Raises:
            StoreError: the database cannot be written.
        """
        if not published:
            return
        params = [(at, d, int(v), r) for d, v, r in published]  # converted before the write lock
        with self._writing("mark assignments published"), self._db.atomic():
            self._check_term()
            self._wconn.executemany(
                "UPDATE rollout_assignments SET published_at = ? WHERE device = ? AND release = ?"
                " AND rollout_id = ? AND published_at IS NULL", params)
