"""The fleet server's SQLite store: the only server module that speaks SQL.

One database file (sqlite-utils on the standard ``sqlite3`` driver) in WAL mode with
``synchronous=NORMAL``: a committed batch survives a crash of the server process, and readers never
block the ingest writer. One connection for writes (the ingest writer, audit, releases, pruning),
guarded by a lock, and a small pool of read connections (the HTTP API, metrics, the rollout runner),
each used by one thread at a time, so that any thread may call any method and an API read never
queues behind another thread's long read.

Tables: ``devices`` (the registry: one row per device, the latest status, online state and event),
``events`` (history; each row keeps the commit time of its release when the release is known, so
commit-to-applied = event ts - commit time), ``health`` (samples), ``releases`` (signed releases
seen by the git watcher), ``audit`` (who did what and why), ``counters`` (ingest totals that survive
restarts) and ``meta`` (the schema version, the rollout runner's cursor and the fleet baseline).

Writes from ingest come as one :class:`IngestBatch` per transaction (``apply_batch``): batching is
what makes SQLite fast enough (about 50k rows/s in transactions of 1000 rows against about 5k/s for
single-row upserts). Every ``sqlite3`` error is translated to :class:`StateError`.

Device labels and profile: a ``status`` that carries ``labels`` or ``profile`` replaces the
device's labels or profile (``labels: {}`` clears them); a status without them leaves them as they
are. :meth:`Store.register_device` sets them too, so the last write wins — and since the agent sends
its ``agent.yaml`` labels and profile with every status, the device's own report wins in the end.
Registering with labels is a seed for devices that have not reported yet (or run an agent that does
not send them).

Timestamps are POSIX seconds (floats). Message timestamps may also be ISO-8601 text (``...Z``);
they are converted on the way in.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_core.errors import StateError

from .store_rollouts import ROLLOUT_SCHEMA, RolloutStoreMixin, migrate_rollouts

__all__ = [
    "INGEST_KINDS",
    "SCHEMA_VERSION",
    "IngestBatch",
    "Received",
    "RolloutWrite",
    "Store",
    "to_epoch",
]

log = logging.getLogger(__name__)

_READERS = 4
"""Read connections at most (each serves one thread at a time)."""

INGEST_KINDS = ("status", "events", "health", "online")
"""The device-to-server message kinds, which are also the last level of their topics."""

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
    *ROLLOUT_SCHEMA,
    # covers summary(): one scan of a narrow index instead of four scans of the table
    "CREATE INDEX IF NOT EXISTS devices_by_summary ON devices (sync_state, online, release)",
)
SCHEMA_VERSION = 1

# Keys of an event message that have their own column; the rest goes to ``detail``.
_EVENT_COLUMNS = ("device", "ts", "type", "commit", "release", "reason", "step")
_EVENT_ENVELOPE = frozenset({*_EVENT_COLUMNS, "schema", "kind"})
# Keys of a status message copied to the device row (message key -> column).
_STATUS_FIELDS = (("release", "release"), ("revision", "revision"), ("sync_state", "sync_state"),
                  ("last_error", "last_error"), ("profile", "profile"))
_DEVICE_COLUMNS = ("id", "labels", "profile", "first_seen", "last_seen", "online", "online_ts", "release",
                   "revision", "sync_state", "paused", "pause_reason", "drift", "last_error", "status_ts",
                   "last_event", "last_event_ts", "registered")


def to_epoch(value: object) -> float | None:
    """Turn a message timestamp (POSIX seconds, or ISO-8601 text such as ``2024-05-01T12:00:00Z``)
    into POSIX seconds; None when it is absent or not a timestamp."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return parsed.timestamp()
    return None


@dataclass(frozen=True)
class Received:
    """One decoded message, the server time at which it arrived, and the time it is stored under:
    its own timestamp, or the arrival time when it carries none."""

    message: Mapping[str, Any]
    received_at: float
    ts: float


@dataclass
class IngestBatch:
    """Decoded messages by kind plus counter increments, written by :meth:`Store.apply_batch` in one
    transaction. Messages of one kind keep their arrival order."""

    status: list[Received] = field(default_factory=list)
    events: list[Received] = field(default_factory=list)
    health: list[Received] = field(default_factory=list)
    online: list[Received] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, message: Mapping[str, Any], received_at: float, ts: float | None = None) -> None:
        """Append one decoded message of ``kind`` (one of :data:`INGEST_KINDS`); ``ts`` is its own
        timestamp in POSIX seconds when the caller has already converted it.

        Raises:
            ValueError: ``kind`` is not an ingest kind.
        """
        if kind not in INGEST_KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        bucket: list[Received] = getattr(self, kind)
        if ts is None:
            ts = to_epoch(message.get("ts"))
        bucket.append(Received(message, received_at, received_at if ts is None else ts))

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the persistent counter ``name`` when the batch is applied."""
        self.counters[name] = self.counters.get(name, 0) + n

    def __len__(self) -> int:
        return len(self.status) + len(self.events) + len(self.health) + len(self.online)


# One encoder for the ingest hot path: json.dumps with options would build a new one per call.
_COMPACT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _json(value: object) -> str | None:
    return None if value is None else _COMPACT_JSON.encode(value)


def _unjson(text: object) -> Any:
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _device_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["labels"] = _unjson(out.get("labels")) or {}
    out["drift"] = _unjson(out.get("drift"))
    for flag in ("online", "paused", "registered"):
        out[flag] = None if out.get(flag) is None else bool(out[flag])
    return out


def _event_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["detail"] = _unjson(out.get("detail")) or {}
    return out


@dataclass
class RolloutWrite:
    """What the rollout runner writes in ONE transaction (:meth:`Store.write_rollouts`).

    Attributes:
        rollouts: rollout rows (``id, release, commit, previous, plan, state, phase, wave, actor,
            reason, created, updated``; ``plan`` and ``state`` as JSON-able values).
        audit: audit rows (``at, actor, action, target, reason, detail``).
        gates: gate decisions (``rollout_id, wave, at, passed, detail``).
        assignments: new ``desired`` assignments (``device, rollout_id, release, commit, assigned_at``),
            stored unpublished; the latest one per device wins.
        samples: wave progress samples (``rollout_id, wave, ts, done, failed, pending, offline,
            deferred, skipped``).
        cursor: the runner's read positions (``events``, ``health``: the last row id consumed).
        devices: rollout device rows that changed (``rollout_id, device, wave, state, data``).
    """

    rollouts: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    assignments: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    cursor: dict[str, int] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)


_ROLLOUT_SUMMARY = "id, release, [commit], previous, phase, wave, actor, reason, created, updated"


def _insert_or_ignore(conn: sqlite3.Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each with the keys of the first; values already SQL types) into ``table``,
    skipping those a unique index already holds. The ingest hot path: one ``executemany``, where a
    generic insert would inspect every value of every row."""
    if not rows:
        return
    columns = list(rows[0])
    names = ", ".join(f"[{c}]" for c in columns)
    marks = ", ".join("?" * len(columns))
    conn.executemany(f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})",  # noqa: S608
                     [tuple(r[c] for c in columns) for r in rows])


class Store(RolloutStoreMixin):
    """The fleet server's database (see the module docstring). Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date.

        Raises:
            StateError: the file cannot be opened or was written by a newer server.
        """
        self.path = Path(path)
        self._write_lock = threading.Lock()
        # Readers: up to _READERS connections, each used by one thread at a time, so an API read
        # does not queue behind the rollout runner's or the metrics' reads (WAL readers run at once).
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._reader_slots = threading.BoundedSemaphore(_READERS)
        self._pool_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wconn = self._connect()
            self._readers.put(self._connect())
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the fleet database {self.path}: {exc}") from exc
        self._db = sqlite_utils.Database(self._wconn, execute_plugins=False)
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _migrate(self) -> None:
        with self._writing("create the schema"):
            self._wconn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    self._wconn.execute(statement)
                migrate_rollouts(self._wconn)
                row = self._wconn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is not None and int(row[0]) > SCHEMA_VERSION:
                    raise StateError(f"fleet database {self.path} has schema {row[0]}, newer than "
                                     f"{SCHEMA_VERSION}")
                self._wconn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)",
                                    (str(SCHEMA_VERSION),))
            except BaseException:
                self._wconn.execute("ROLLBACK")
                raise
            self._wconn.execute("COMMIT")

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        with self._write_lock:
            try:
                yield
            except sqlite3.Error as exc:
                if self._wconn.in_transaction:
                    self._wconn.rollback()
                raise StateError(f"cannot {what} in {self.path}: {exc}") from exc

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._reader_slots:
            if self._closed:
                raise StateError(f"cannot {what} from {self.path}: the store is closed")
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                try:
                    conn = self._connect()
                except sqlite3.Error as exc:
                    raise StateError(f"cannot {what} from {self.path}: {exc}") from exc
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StateError(f"cannot {what} from {self.path}: {exc}") from exc
            finally:
                self._give_back(conn)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if self._closed:
                conn.close()
            else:
                self._readers.put(conn)

    def close(self) -> None:
        """Close every connection (idempotent); a read in progress closes its own when it ends."""
        with self._write_lock, self._pool_lock:
            self._closed = True
            self._wconn.close()
            while True:
                try:
                    self._readers.get_nowait().close()
                except queue.Empty:
                    break

    # --- ingest ----------------------------------------------------------------------------------

    def apply_batch(self, batch: IngestBatch) -> None:
        """Write one batch of decoded messages in ONE transaction: upsert the devices it concerns,
        insert its events and health samples, add its counters. All or nothing. An event or
        health sample already stored (same device, time and type: a redelivery) is not stored twice.

        Raises:
            StateError: the database cannot be written (nothing of the batch is stored).
        """
        if not len(batch) and not batch.counters:
            return
        devices = self._device_updates(batch)
        with self._writing("store an ingest batch"), self._db.atomic():
            self._write_devices(devices)
            if batch.events:
                _insert_or_ignore(self._wconn, "events", self._event_rows(batch.events))
            if batch.health:
                _insert_or_ignore(self._wconn, "health", [self._health_row(r) for r in batch.health])
            if batch.counters:
                self._wconn.executemany(
                    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name)"
                    " DO UPDATE SET value = value + excluded.value", sorted(batch.counters.items()))

    @staticmethod
    def _device_updates(batch: IngestBatch) -> dict[str, dict[str, Any]]:
        """Merge the batch into one update per device, later messages winning."""
        updates: dict[str, dict[str, Any]] = {}

        def touch(r: Received) -> dict[str, Any]:
            device = str(r.message["device"])
            upd = updates.setdefault(device, {"id": device, "first_seen": r.received_at,
                                              "last_seen": r.received_at})
            upd["first_seen"] = min(upd["first_seen"], r.received_at)
            upd["last_seen"] = max(upd["last_seen"], r.received_at)
            return upd

        for r in batch.status:
            m, upd = r.message, touch(r)
            for key, column in _STATUS_FIELDS:
                if key in m:
                    upd[column] = _int(m[key]) if column == "release" else _text(m[key])
            if "revision" not in m and "commit" in m:
                upd["revision"] = _text(m["commit"])
            if isinstance(m.get("labels"), Mapping):
                upd["labels"] = _json(dict(m["labels"]))
            if "drift" in m:
                upd["drift"] = _json(m["drift"])
            if "paused" in m:
                paused = m["paused"]
                upd["paused"] = 1 if paused else 0
                upd["pause_reason"] = paused if isinstance(paused, str) else _text(m.get("pause_reason"))
            upd["status_ts"] = r.ts
        for r in batch.online:
            m, upd = r.message, touch(r)
            online = m.get("online")
            if not isinstance(online, bool):
                online = m.get("state") == "online"
            upd["online"] = 1 if online else 0
            upd["online_ts"] = r.ts
        for r in batch.events:
            m, upd = r.message, touch(r)
            upd["last_event"] = _text(m.get("type"))
            upd["last_event_ts"] = r.ts
        for r in batch.health:
            touch(r)
        return updates

    def _write_devices(self, updates: Mapping[str, dict[str, Any]]) -> None:
        if not updates:
            return
        fresh = [{"id": u["id"], "first_seen": u["first_seen"], "last_seen": u["last_seen"]}
                 for u in updates.values()]
        _insert_or_ignore(self._wconn, "devices", fresh)
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for upd in updates.values():  # grouped by the columns an update sets, in the order it set them
            columns = tuple(k for k in upd if k not in {"id", "first_seen"})
            groups.setdefault(columns, []).append((*(upd[c] for c in columns), upd["id"]))
        for columns, params in groups.items():
            assignments = ", ".join(f"[{c}] = ?" for c in columns)
            self._wconn.executemany(f"UPDATE devices SET {assignments} WHERE id = ?", params)  # noqa: S608

    def _event_rows(self, events: Sequence[Received]) -> list[dict[str, Any]]:
        commits = sorted({c for r in events if isinstance(c := r.message.get("commit"), str)})
        known: dict[str, float] = {}
        for start in range(0, len(commits), 500):
            chunk = commits[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._wconn.execute(
                    f"SELECT [commit], committed_at FROM releases WHERE [commit] IN ({marks})"  # noqa: S608
                    " AND committed_at IS NOT NULL", chunk):
                known[row[0]] = row[1]
        rows = []
        for r in events:
            m = r.message
            commit = m.get("commit") if isinstance(m.get("commit"), str) else None
            detail = {k: v for k, v in m.items() if k not in _EVENT_ENVELOPE}
            rows.append({
                "device": str(m["device"]), "ts": r.ts,
                "received_at": r.received_at, "type": _text(m.get("type")) or "unknown", "commit": commit,
                "release": _int(m.get("release")), "reason": _text(m.get("reason")),
                "step": _text(m.get("step")), "detail": _json(detail) if detail else None,
                "committed_at": known.get(commit) if commit else None,
            })
        return rows

    @staticmethod
    def _health_row(r: Received) -> dict[str, Any]:
        m = r.message
        metrics = m.get("metrics")
        if metrics is None:
            metrics = {k: v for k, v in m.items() if k not in {"schema", "device", "ts", "checks", "kind"}}
        return {"device": str(m["device"]), "ts": r.ts,
                "received_at": r.received_at, "metrics": _json(metrics), "checks": _json(m.get("checks"))}

    def register_device(self, device_id: str, *, labels: Mapping[str, str] | None = None,
                        profile: str | None = None, now: float | None = None) -> None:
        """Make ``device_id`` known before it ever reports (the ``unknown_devices: refuse`` policy
        accepts only known devices). Labels and profile are set only when given; the next ``status``
        from the device that carries labels or a profile replaces them (the device's report wins).

        Raises:
            StateError: the database cannot be written.
        """
        at = time.time() if now is None else now
        with self._writing("register a device"), self._db.atomic():
            self._wconn.execute(
                "INSERT INTO devices (id, first_seen, last_seen, registered) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (id) DO UPDATE SET registered = 1", (device_id, at, at))
            if labels is not None:
                self._wconn.execute("UPDATE devices SET labels = ? WHERE id = ?",
                                    (_json(dict(labels)), device_id))
            if profile is not None:
                self._wconn.execute("UPDATE devices SET profile = ? WHERE id = ?", (profile, device_id))

    # --- reads -----------------------------------------------------------------------------------

    def devices(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                online: bool | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        """Return devices (ordered by id) matching every given label, the sync state and online flag.

        Raises:
            StateError: the database cannot be read.
        """
        where, params = self._device_filter(label, sync_state, online)
        sql = (f"SELECT * FROM devices{where} ORDER BY id LIMIT ? OFFSET ?")  # noqa: S608
        with self._reading("list devices") as conn:
            rows = conn.execute(sql, [*params, max(0, int(limit)), max(0, int(offset))]).fetchall()
        return [_device_row(r) for r in rows]

    def count_devices(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                      online: bool | None = None) -> int:
        """Return how many devices match the same filters as :meth:`devices`.

        Raises:
            StateError: the database cannot be read.
        """
        where, params = self._device_filter(label, sync_state, online)
        with self._reading("count devices") as conn:
            return int(conn.execute(f"SELECT count(*) FROM devices{where}", params).fetchone()[0])  # noqa: S608

    @staticmethod
    def _device_filter(label: Mapping[str, str] | None, sync_state: str | None,
                       online: bool | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for key, value in sorted((label or {}).items()):
            clauses.append("EXISTS (SELECT 1 FROM json_each(devices.labels) AS l WHERE l.key = ?"
                           " AND l.value = ?)")
            params += [key, value]
        if sync_state is not None:
            clauses.append("sync_state = ?")
            params.append(sync_state)
        if online is not None:
            clauses.append("coalesce(online, 0) = ?")
            params.append(1 if online else 0)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return one device's registry row, or None when it is unknown.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read a device") as conn:
            row = conn.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return None if row is None else _device_row(row)

    def known_device(self, device_id: str) -> bool:
        """Return True when the device has a registry row (it reported or was registered).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("look a device up") as conn:
            return conn.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is not None

    def known_devices(self) -> set[str]:
        """Return the ids of every device with a registry row.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("list device ids") as conn:
            return {r[0] for r in conn.execute("SELECT id FROM devices")}

    def device_events(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Return the device's most recent events, newest first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read device events") as conn:
            rows = conn.execute(
                "SELECT e.id, e.device, e.ts, e.received_at, e.type, e.[commit], e.release, e.reason, e.step,"
                " e.detail, coalesce(e.committed_at, r.committed_at) AS committed_at FROM events e"
                " LEFT JOIN releases r ON r.[commit] = e.[commit]"
                " WHERE e.device = ? ORDER BY e.id DESC LIMIT ?", (device_id, max(0, int(limit)))).fetchall()
        return [_event_row(r) for r in rows]

    def device_health(self, device_id: str, since: float | None = None,
                      limit: int = 500) -> list[dict[str, Any]]:
        """Return the device's health samples (newest first), only those at or after ``since``.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read device health") as conn:
            rows = conn.execute(
                "SELECT id, device, ts, received_at, metrics, checks FROM health WHERE device = ? AND ts >= ?"
                " ORDER BY ts DESC, id DESC LIMIT ?",
                (device_id, float("-inf") if since is None else since, max(0, int(limit)))).fetchall()
        return [{**dict(r), "metrics": _unjson(r["metrics"]), "checks": _unjson(r["checks"])} for r in rows]

    def summary(self) -> dict[str, Any]:
        """Return fleet totals: ``devices``, ``by_sync_state``, ``online``/``offline`` and ``releases``
        (how many devices run each release version; ``null`` for none reported).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("summarise the fleet") as conn:
            groups = conn.execute("SELECT sync_state, online, release, count(*) FROM devices"
                                  " GROUP BY sync_state, online, release").fetchall()
        total = online = 0
        by_state: dict[str, int] = {}
        by_release: dict[int | None, int] = {}
        for sync_state, is_online, release, count in groups:
            n = int(count)
            total += n
            online += n if is_online == 1 else 0
            key = str(sync_state if sync_state is not None else "unknown")
            by_state[key] = by_state.get(key, 0) + n
            by_release[release] = by_release.get(release, 0) + n
        ordered = sorted(by_release.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
        return {"devices": total, "by_sync_state": dict(sorted(by_state.items())), "online": online,
                "offline": total - online, "releases": [{"release": r, "devices": n} for r, n in ordered]}

    def counters(self) -> dict[str, int]:
        """Return the persistent ingest counters (name -> total).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read counters") as conn:
            return {r[0]: int(r[1]) for r in conn.execute("SELECT name, value FROM counters ORDER BY name")}

    # --- service-level inputs --------------------------------------------------------------------

    def event_counts(self, *, since: float | None = None) -> dict[str, int]:
        """Return how many events of each type arrived at or after ``since`` (received time).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("count events") as conn:
            return {r[0]: int(r[1]) for r in conn.execute(
                "SELECT type, count(*) FROM events WHERE received_at >= ? GROUP BY type",
                (float("-inf") if since is None else since,))}

    def commit_to_applied(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from release commit to ``sync_succeeded`` for the newest applied events whose
        release commit time is known.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read commit-to-applied times") as conn:
            return [float(r[0]) for r in conn.execute(
                "SELECT e.ts - coalesce(e.committed_at, r.committed_at) FROM events e"
                " LEFT JOIN releases r ON r.[commit] = e.[commit]"
                " WHERE e.type = 'sync_succeeded' AND e.received_at >= ?"
                " AND coalesce(e.committed_at, r.committed_at) IS NOT NULL ORDER BY e.id DESC LIMIT ?",
                (float("-inf") if since is None else since, max(0, int(limit))))]

    def drift_recovery_times(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from ``drift_detected`` to the next ``drift_corrected`` on the same device.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read drift recovery times") as conn:
            return [float(r[0]) for r in conn.execute(
                "SELECT c.ts - (SELECT max(d.ts) FROM events d WHERE d.device = c.device"
                " AND d.type = 'drift_detected' AND d.ts <= c.ts) AS took FROM events c"
                " WHERE c.type = 'drift_corrected' AND c.received_at >= ? AND took IS NOT NULL"
                " ORDER BY c.id DESC LIMIT ?",
                (float("-inf") if since is None else since, max(0, int(limit))))]

    def applied_from_releases(self, *, since: float | None = None) -> tuple[int, int]:
        """Return (``sync_succeeded`` events, those whose commit is a recorded signed release).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("count applied releases") as conn:
            row = conn.execute(
                "SELECT count(*), count(r.version) FROM events e"
                " LEFT JOIN releases r ON r.[commit] = e.[commit]"
                " WHERE e.type = 'sync_succeeded' AND e.received_at >= ?",
                (float("-inf") if since is None else since,)).fetchone()
        return int(row[0]), int(row[1])

    # --- audit and releases ----------------------------------------------------------------------

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Append one entry to the audit log (who did what to which target, and why).

        Raises:
            StateError: the database cannot be written.
        """
        at = time.time() if now is None else now
        with self._writing("append to the audit log"), self._db.atomic():
            self._db.table("audit").insert({"at": at, "actor": actor, "action": action, "target": target,
                                      "reason": reason, "detail": _json(dict(detail) if detail else None)})

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return the newest audit entries first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read the audit log") as conn:
            rows = conn.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?",
                                (max(0, int(limit)),)).fetchall()
        return [{**dict(r), "detail": _unjson(r["detail"])} for r in rows]

    def record_release(self, version: int, commit: str, signers: Sequence[str], seen_at: float, *,
                       committed_at: float | None = None) -> bool:
        """Record a verified signed release; return False when that version is already known.

        ``committed_at`` is the commit's time (for commit-to-applied); events already stored for the
        commit get it too.

        Raises:
            StateError: the database cannot be written.
        """
        with self._writing("record a release"), self._db.atomic():
            cur = self._wconn.execute(
                "INSERT OR IGNORE INTO releases (version, [commit], signers, seen_at, committed_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (int(version), commit, _json(sorted(signers)), seen_at, committed_at))
            added = cur.rowcount == 1
            if added and committed_at is not None:
                self._wconn.execute(
                    "UPDATE events SET committed_at = ? WHERE [commit] = ? AND committed_at IS NULL",
                    (committed_at, commit))
        if added:
            log.info("release %s (commit %s) recorded", version, commit)
        return added

    def releases(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return the newest recorded releases first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read releases") as conn:
            rows = conn.execute("SELECT * FROM releases ORDER BY version DESC LIMIT ?",
                                (max(0, int(limit)),)).fetchall()
        return [{**dict(r), "signers": _unjson(r["signers"]) or []} for r in rows]

    # --- rollouts ---------------------------------------------------------------------------------

    def write_rollouts(self, write: RolloutWrite) -> None:
        """Write the rollout runner's step results in ONE transaction: rollout states, their audit
        entries, gate decisions, new (unpublished) assignments, progress samples and the read cursor.

        Raises:
            StateError: the database cannot be written (nothing is stored).
        """
        with self._writing("store rollout state"), self._db.atomic():
            for row in write.rollouts:
                self._wconn.execute(
                    "INSERT INTO rollout_records (id, release, [commit], previous, plan, state, phase, wave,"
                    " actor, reason, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET state = excluded.state, phase = excluded.phase,"
                    " wave = excluded.wave,"
                    " updated = excluded.updated",
                    (row["id"], int(row["release"]), row["commit"], row.get("previous"), _json(row["plan"]),
                     _json(row["state"]), row["phase"], int(row["wave"]), row.get("actor"), row.get("reason"),
                     row["created"], row["updated"]))
            if write.audit:
                self._wconn.executemany(
                    "INSERT INTO audit (at, actor, action, target, reason, detail) VALUES (?, ?, ?, ?, ?, ?)",
                    [(a["at"], a["actor"], a["action"], a["target"], a["reason"],
                      _json(dict(a["detail"])) if a.get("detail") else None) for a in write.audit])
            if write.gates:
                self._wconn.executemany(
                    "INSERT INTO rollout_gates (rollout_id, wave, at, passed, detail) VALUES (?, ?, ?, ?, ?)",
                    [(g["rollout_id"], g["wave"], g["at"], 1 if g["passed"] else 0, _json(g.get("detail")))
                     for g in write.gates])
            if write.assignments:
                self._wconn.executemany(
                    "INSERT OR REPLACE INTO rollout_assignments (device, rollout_id, release, [commit],"
                    " assigned_at, published_at) VALUES (?, ?, ?, ?, ?, NULL)",
                    [(a["device"], a["rollout_id"], int(a["release"]), a["commit"], a["assigned_at"])
                     for a in write.assignments])
            if write.samples:
                self._wconn.executemany(
                    "INSERT OR REPLACE INTO rollout_samples (rollout_id, wave, ts, done, failed, pending,"
                    " offline, deferred, skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(s["rollout_id"], s["wave"], s["ts"], s["done"], s["failed"], s["pending"], s["offline"],
                      s["deferred"], s["skipped"]) for s in write.samples])
            self._write_rollout_devices(write.devices)
            if write.cursor is not None:
                self._wconn.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(f"rollout_cursor.{k}", str(int(v))) for k, v in sorted(write.cursor.items())])

    def fleet_baseline(self) -> tuple[int, str] | None:
        """Return the stored fleet baseline ``(release, commit)``, None before the first one.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read the fleet baseline") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'fleet_baseline'").fetchone()
        if row is None:
            return None
        doc = _unjson(row[0])
        if not isinstance(doc, dict) or not isinstance(doc.get("release"), int) \
                or not isinstance(doc.get("commit"), str):
            return None
        return int(doc["release"]), str(doc["commit"])

    def set_fleet_baseline(self, release: int, commit: str) -> None:
        """Store the fleet baseline (the last-good release devices without an assignment run).

        Raises:
            StateError: the database cannot be written.
        """
        with self._writing("store the fleet baseline"), self._db.atomic():
            self._wconn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('fleet_baseline', ?)",
                                (_json({"release": int(release), "commit": commit}),))

    def rollout_cursor(self) -> dict[str, int] | None:
        """Return the rollout runner's read positions (``events``, ``health``), None before the first write.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read the rollout cursor") as conn:
            rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'rollout_cursor.%'").fetchall()
        if not rows:
            return None
        return {str(r[0]).split(".", 1)[1]: int(r[1]) for r in rows}

    def history_heads(self) -> dict[str, int]:
        """Return the highest row id of ``events`` and ``health`` (0 when empty).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read history heads") as conn:
            return {"events": int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]),
                    "health": int(conn.execute("SELECT coalesce(max(id), 0) FROM health").fetchone()[0])}

    def events_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return events with a row id above ``after``, oldest first (``detail`` decoded).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read new events") as conn:
            rows = conn.execute(
                "SELECT id, device, ts, received_at, type, [commit], release, reason, step, detail"
                " FROM events WHERE id > ? ORDER BY id LIMIT ?", (int(after), max(1, int(limit)))).fetchall()
        return [_event_row(r) for r in rows]

    def health_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return health samples with a row id above ``after``, oldest first (metrics and checks decoded).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read new health samples") as conn:
            rows = conn.execute(
                "SELECT h.id, h.device, h.ts, h.metrics, h.checks, d.release FROM health h"
                " LEFT JOIN devices d ON d.id = h.device WHERE h.id > ? ORDER BY h.id LIMIT ?",
                (int(after), max(1, int(limit)))).fetchall()
        return [{**dict(r), "metrics": _unjson(r["metrics"]), "checks": _unjson(r["checks"])} for r in rows]

    def device_snapshot(self) -> list[dict[str, Any]]:
        """Return every device's id, labels, profile, online and paused flags and release (by id).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read the device snapshot") as conn:
            rows = conn.execute("SELECT id, labels, profile, online, paused, release, revision FROM devices"
                                " ORDER BY id").fetchall()
        return [_device_row(r) for r in rows]

    def release_commit(self, version: int) -> str | None:
        """Return the commit of a recorded signed release, or None when it is unknown.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read a release") as conn:
            row = conn.execute("SELECT [commit] FROM releases WHERE version = ?", (int(version),)).fetchone()
        return None if row is None else str(row[0])

    def rollout_rows(self, *, phases: Sequence[str] | None = None, limit: int = 100,
                     with_state: bool = True) -> list[dict[str, Any]]:
        """Return rollouts newest first, with their state decoded (unless ``with_state`` is False: then
        as :meth:`rollout_summaries` returns them); only the given phases when set.

        Raises:
            StateError: the database cannot be read.
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
        return [{**dict(r), "plan": _unjson(r["plan"]), "state": _unjson(r["state"])} for r in rows]

    def rollout_summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return rollouts newest first without their state (id, releases, phase, wave, who, when).

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("list rollouts") as conn:
            rows = conn.execute(f"SELECT {_ROLLOUT_SUMMARY} FROM rollouts ORDER BY created DESC, id DESC"  # noqa: S608
                                " LIMIT ?", (max(0, int(limit)),)).fetchall()
        return [dict(r) for r in rows]

    def rollout_row(self, rollout_id: str) -> dict[str, Any] | None:
        """Return one rollout with its plan and state decoded, or None.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read a rollout") as conn:
            row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "plan": _unjson(row["plan"]), "state": _unjson(row["state"])}

    def rollout_gates(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """Return a rollout's gate decisions, oldest first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read gate decisions") as conn:
            rows = conn.execute("SELECT wave, at, passed, detail FROM rollout_gates WHERE rollout_id = ?"
                                " ORDER BY id LIMIT ?", (rollout_id, max(0, int(limit)))).fetchall()
        return [{**dict(r), "passed": bool(r["passed"]), "detail": _unjson(r["detail"])} for r in rows]

    def rollout_samples(self, rollout_id: str, limit: int = 5000) -> list[dict[str, Any]]:
        """Return a rollout's wave progress samples, oldest first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._reading("read rollout samples") as conn:
            rows = conn.execute("SELECT * FROM rollout_samples WHERE rollout_id = ?"
                                " ORDER BY ts, wave LIMIT ?", (rollout_id, max(0, int(limit)))).fetchall()
        return [dict(r) for r in rows]

    def latest_rollout_samples(self, rollout_id: str) -> list[dict[str, Any]]:
        """Return a rollout's newest progress sample of every wave, by wave.

        Raises:
            StateError: the database cannot be read.
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
            StateError: the database cannot be read.
        """
        with self._reading("read a rollout's audit log") as conn:
            rows = conn.execute("SELECT * FROM audit WHERE target = ? ORDER BY id LIMIT ?",
                                (f"rollout/{rollout_id}", max(0, int(limit)))).fetchall()
        return [{**dict(r), "detail": _unjson(r["detail"])} for r in rows]

    def assignments(self, *, unpublished: bool = False) -> list[dict[str, Any]]:
        """Return the current ``desired`` assignment of every assigned device (only the unpublished ones
        when asked), ordered by device.

        Raises:
            StateError: the database cannot be read.
        """
        where = " WHERE published_at IS NULL" if unpublished else ""
        with self._reading("read assignments") as conn:
            rows = conn.execute(f"SELECT * FROM rollout_assignments{where} ORDER BY device").fetchall()  # noqa: S608
        return [dict(r) for r in rows]

    def mark_published(self, published: Sequence[tuple[str, int, str]], at: float) -> None:
        """Mark the assignments ``(device, release, rollout_id)`` as published at ``at`` (rows replaced by
        a newer assignment since are left alone).

        Raises:
            StateError: the database cannot be written.
        """
        if not published:
            return
        with self._writing("mark assignments published"), self._db.atomic():
            self._wconn.executemany(
                "UPDATE rollout_assignments SET published_at = ? WHERE device = ? AND release = ?"
                " AND rollout_id = ? AND published_at IS NULL",
                [(at, d, int(v), r) for d, v, r in published])

    # --- retention -------------------------------------------------------------------------------

    def prune(self, now: float, events_max_age: float, health_max_age: float) -> int:
        """Delete events and health samples received longer ago than their maximum age; return how
        many rows were deleted. Deletes in chunks so that ingest is never blocked for long.

        Raises:
            StateError: the database cannot be written.
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

    # --- schema -------------------------------------------------------------------------------------

    @staticmethod
    def device_columns() -> tuple[str, ...]:
        """Return the columns of a device row, in table order (for API documentation and tests)."""
        return _DEVICE_COLUMNS
