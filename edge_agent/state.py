"""The agent's local state in SQLite: the only module on the device that speaks SQL.

One connection per :class:`StateDB`, WAL journal, ``synchronous=FULL`` (a commit is on disk when
it returns: the journal and the outbox rely on it), foreign keys on, ``isolation_level=None`` with
explicit ``BEGIN IMMEDIATE`` write transactions, and a schema version table with forward
migrations. Every ``sqlite3`` error is translated to :class:`StateError`.

What lives here: the installed release, the rollback floor and trust root, the managed resources
(with the backup record of what was there before the agent took a path over), the transaction
journal, drift findings, an event history for ``status``, a bounded outbox of reports and small
key/value metadata. Secret plaintext must never be passed in: specs and details are stored as is.

Timestamps default to ``time.time()``; every writer takes ``now=`` so callers and tests can pin it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_core.errors import StateError

__all__ = [
    "OUTBOX_CLASSES",
    "SCHEMA_VERSION",
    "TXN_OUTCOMES",
    "DriftFinding",
    "Event",
    "Installed",
    "JournalEntry",
    "Managed",
    "OpenTxn",
    "OutboxItem",
    "StateDB",
]

log = logging.getLogger(__name__)

OUTBOX_CLASSES = ("outcome", "event", "status", "health")
"""Outbox message classes; when the outbox is full, health goes first, then old status, then events."""

TXN_OUTCOMES = ("committed", "rolled_back", "failed")

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the tables
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE installed (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,"
        " commit_id TEXT NOT NULL, applied_at REAL NOT NULL, bundles TEXT NOT NULL)",
        "CREATE TABLE trust (id INTEGER PRIMARY KEY CHECK (id = 1), floor INTEGER NOT NULL DEFAULT 0,"
        " root TEXT)",
        "INSERT INTO trust (id, floor, root) VALUES (1, 0, NULL)",
        "CREATE TABLE managed (resource_id TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL,"
        " digest TEXT NOT NULL, original TEXT, first_managed_at REAL NOT NULL)",
        "CREATE TABLE txn (id INTEGER PRIMARY KEY AUTOINCREMENT, txn_id TEXT NOT NULL UNIQUE,"
        " version INTEGER NOT NULL, commit_id TEXT NOT NULL, begun_at REAL NOT NULL,"
        " finished_at REAL, outcome TEXT)",
        "CREATE TABLE journal (txn_id TEXT NOT NULL REFERENCES txn (txn_id) ON DELETE CASCADE,"
        " seq INTEGER NOT NULL, resource_id TEXT NOT NULL, action TEXT NOT NULL, backup TEXT NOT NULL,"
        " done INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (txn_id, seq))",
        "CREATE TABLE drift (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
        " resource_id TEXT NOT NULL, expected TEXT NOT NULL, found TEXT NOT NULL,"
        " corrected INTEGER NOT NULL)",
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL,"
        " detail TEXT NOT NULL)",
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, cls TEXT NOT NULL,"
        " created_at REAL NOT NULL)",
    ),
    (  # 2: indexes for the outbox trimming and the open-transaction lookup
        "CREATE INDEX outbox_by_cls ON outbox (cls, id)",
        "CREATE INDEX txn_open ON txn (outcome, id)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_DROPPED_KEY = "outbox.dropped."


@dataclass(frozen=True)
class Installed:
    """The release currently applied on the device."""

    version: int
    commit: str
    applied_at: float
    bundles: tuple[str, ...]


class Managed:
    """A resource the agent manages; ``original`` is the fsafe capture record from before it did.

    Read from the database, ``spec`` and ``original`` stay JSON text until first used: a sync
    that changes nothing compares digests only and never decodes them.
    """

    __slots__ = ("_original", "_original_text", "_spec", "_spec_text", "digest", "first_managed_at", "kind",
                 "resource_id")

    def __init__(self, resource_id: str, kind: str, spec: dict[str, Any], digest: str,  # noqa: PLR0917
                 original: dict[str, Any] | None, first_managed_at: float) -> None:
        """Describe a managed resource from decoded values."""
        self.resource_id = resource_id
        self.kind = kind
        self.digest = digest
        self.first_managed_at = first_managed_at
        self._spec: dict[str, Any] | None = spec
        self._spec_text: str | None = None
        self._original: dict[str, Any] | None = original
        self._original_text: str | None = None

    @classmethod
    def from_row(cls, row: tuple[str, str, str, str, str | None, float]) -> Managed:
        """Describe a managed resource from its stored row, decoding the JSON columns on first use."""
        resource_id, kind, spec_text, digest, original_text, first_managed_at = row
        m = cls(resource_id, kind, {}, digest, None, float(first_managed_at))
        m._spec, m._spec_text, m._original_text = None, spec_text, original_text
        return m

    @property
    def spec(self) -> dict[str, Any]:
        """The resource's recorded spec (what its digest was computed from)."""
        if self._spec is None:
            self._spec = _loads(self._spec_text or "", f"spec of {self.resource_id}")
        return self._spec

    @property
    def original(self) -> dict[str, Any] | None:
        """The capture record of what was at the path before the agent managed it, if anything."""
        if self._original is None and self._original_text is not None:
            self._original = _loads(self._original_text, f"original of {self.resource_id}")
        return self._original

    def _key(self) -> tuple[Any, ...]:
        return (self.resource_id, self.kind, self.spec, self.digest, self.original, self.first_managed_at)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Managed) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable caches inside; compared by value only

    def __repr__(self) -> str:
        return (f"Managed(resource_id={self.resource_id!r}, kind={self.kind!r}, spec={self.spec!r}, "
                f"digest={self.digest!r}, original={self.original!r}, "
                f"first_managed_at={self.first_managed_at!r})")


@dataclass(frozen=True)
class JournalEntry:
    """One planned change of a transaction, with the backup records taken before it."""

    seq: int
    resource_id: str
    action: str
    backup: list[dict[str, Any]]
    done: bool


@dataclass(frozen=True)
class OpenTxn:
    """A transaction that was begun and never finished (the agent stopped in the middle)."""

    txn_id: str
    version: int
    commit: str
    begun_at: float
    entries: tuple[JournalEntry, ...]


@dataclass(frozen=True)
class DriftFinding:
    """One drift finding: what was expected, what was found, and whether it was corrected."""

    id: int
    at: float
    resource_id: str
    expected: str
    found: str
    corrected: bool


@dataclass(frozen=True)
class Event:
    """One entry of the local event history."""

    id: int
    at: float
    kind: str
    detail: dict[str, Any]


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


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{what} is not JSON-serialisable: {exc}") from exc


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StateError(f"stored {what} is not valid JSON") from exc


def _managed_rows(put: Iterable[Managed]) -> list[tuple[Any, ...]]:
    return [
        (m.resource_id, m.kind, _dumps(m.spec, f"spec of {m.resource_id}"), m.digest,
         None if m.original is None else _dumps(m.original, f"original of {m.resource_id}"),
         float(m.first_managed_at))
        for m in put
    ]


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class StateDB:
    """The agent's SQLite database. Thread-safe (one connection behind a lock); close when done."""

    def __init__(self, path: Path, *, max_outbox: int = 10_000, max_history: int = 10_000) -> None:
        """Open (creating if needed: directory 0700, file 0600) and migrate the database at ``path``.

        ``max_outbox`` bounds the outbox (see :meth:`outbox_put`); ``max_history`` bounds the drift
        and event history (oldest rows are dropped).

        Raises:
            StateError: the file cannot be created or opened, is not a database, is corrupted, or
                was written by a newer agent (unknown schema version).
        """
        if max_outbox < 1 or max_history < 1:
            raise StateError("max_outbox and max_history must be positive")
        self.path = Path(path)
        self.max_outbox = max_outbox
        self.max_history = max_history
        self._lock = threading.RLock()
        try:
            if not self.path.parent.exists():
                self.path.parent.mkdir(mode=0o700, parents=True)
            # Create the file 0600 when it is missing, and never open or close an existing one
            # ourselves: closing any descriptor of the file drops the POSIX locks that other SQLite
            # connections of this process hold on it, letting another process write concurrently.
            if not self.path.exists():
                with contextlib.suppress(FileExistsError):
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600)
                    os.close(fd)
        except OSError as exc:
            raise StateError(f"cannot create the state database {self.path}: {exc.strerror}") from exc
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database {self.path}: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    def _setup(self) -> None:
        with self._guard("open"):
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"state database {self.path}: cannot switch to WAL (got {mode})")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=10000")
        with self._write("migrate"):
            self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = int(row[0] or 0)
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} has schema {current}, newer than {SCHEMA_VERSION}"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    self._conn.execute(statement)
                log.info("state database %s migrated to schema %s", self.path, version)
            if current != SCHEMA_VERSION:
                self._conn.execute("DELETE FROM schema_version")
                self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Hold the lock and translate sqlite3 errors (no transaction)."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise StateError(f"state database {self.path}: cannot {what}: {exc}") from exc

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` write transaction; rolled back on any error."""
        with self._guard(what):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise

    @contextmanager
    def _read(self, what: str) -> Iterator[None]:
        """A read transaction (consistent snapshot across several SELECTs)."""
        with self._guard(what):
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql, args).fetchone()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        """Return the schema version of the open database.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read the schema version"):
            return int(self._one("SELECT max(version) FROM schema_version")[0])

    # -- installed release, floor, trust root ---------------------------------------------------

    def installed(self) -> Installed | None:
        """Return the installed release, or ``None`` before the first successful apply.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read the installed release"):
            row = self._one("SELECT version, commit_id, applied_at, bundles FROM installed WHERE id = 1")
        if row is None:
            return None
        bundles = _loads(row[3], "bundle list")
        return Installed(int(row[0]), str(row[1]), float(row[2]), tuple(str(b) for b in bundles))

    def set_installed(
        self, version: int, commit: str, bundles: Iterable[str], *, now: float | None = None
    ) -> None:
        """Record the release now installed.

        Raises:
            StateError: the database cannot be written.
        """
        text = _dumps(list(bundles), "bundle list")
        with self._write("record the installed release"):
            self._conn.execute(
                "INSERT OR REPLACE INTO installed (id, version, commit_id, applied_at, bundles)"
                " VALUES (1, ?, ?, ?, ?)",
                (int(version), commit, _now(now), text),
            )

    def floor(self) -> int:
        """Return the highest rollback floor verified so far (0 if none).

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read the rollback floor"):
            return int(self._one("SELECT floor FROM trust WHERE id = 1")[0])

    def raise_floor(self, n: int) -> int:
        """Raise the rollback floor to ``n`` (never lowers it); return the floor now in force.

        Raises:
            StateError: the database cannot be written.
        """
        with self._write("raise the rollback floor"):
            self._conn.execute("UPDATE trust SET floor = max(floor, ?) WHERE id = 1", (int(n),))
            return int(self._one("SELECT floor FROM trust WHERE id = 1")[0])

    def trust_root(self) -> dict[str, Any] | None:
        """Return the stored trust root document, or ``None`` if none was stored.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read the trust root"):
            text = self._one("SELECT root FROM trust WHERE id = 1")[0]
        if text is None:
            return None
        doc = _loads(text, "trust root")
        if not isinstance(doc, dict):
            raise StateError("stored trust root is not a JSON object")
        return doc

    def set_trust_root(self, doc: dict[str, Any]) -> None:
        """Store the trust root document (replacing the previous one).

        Raises:
            StateError: not JSON-serialisable, or the database cannot be written.
        """
        text = _dumps(doc, "trust root")
        with self._write("store the trust root"):
            self._conn.execute("UPDATE trust SET root = ? WHERE id = 1", (text,))

    # -- managed resources ----------------------------------------------------------------------

    def managed(self) -> dict[str, Managed]:
        """Return every managed resource by id.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read the managed resources"):
            rows = self._conn.execute(
                "SELECT resource_id, kind, spec, digest, original, first_managed_at FROM managed"
                " ORDER BY resource_id"
            ).fetchall()
        return {row[0]: Managed.from_row(row) for row in rows}

    def update_managed(self, put: Iterable[Managed], forget: Iterable[str]) -> None:
        """Insert or replace the resources ``put`` and forget the ids ``forget`` (absent ids are fine),
        in one transaction. A spec must never hold secret plaintext.

        Raises:
            StateError: not JSON-serialisable, or the database cannot be written.
        """
        rows, gone = _managed_rows(put), [(rid,) for rid in forget]
        if not rows and not gone:
            return
        with self._write("record the managed resources"):
            self._store_managed(rows, gone)

    def _store_managed(self, rows: list[tuple[Any, ...]], gone: list[tuple[str]]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO managed (resource_id, kind, spec, digest, original, first_managed_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", rows,
        )
        self._conn.executemany("DELETE FROM managed WHERE resource_id = ?", gone)

    # -- journal --------------------------------------------------------------------------------

    def begin_txn(self, txn_id: str, *, version: int, commit: str, now: float | None = None) -> None:
        """Start a transaction applying release ``version``/``commit``.

        Raises:
            StateError: another transaction is still open, ``txn_id`` was used before, or the
                database cannot be written.
        """
        with self._write("begin a transaction"):
            row = self._one("SELECT txn_id FROM txn WHERE outcome IS NULL ORDER BY id DESC LIMIT 1")
            if row is not None:
                raise StateError(f"transaction {row[0]} is still open; recover it first")
            if self._one("SELECT 1 FROM txn WHERE txn_id = ?", (txn_id,)) is not None:
                raise StateError(f"transaction id {txn_id} was already used")
            self._conn.execute(
                "INSERT INTO txn (txn_id, version, commit_id, begun_at) VALUES (?, ?, ?, ?)",
                (txn_id, int(version), commit, _now(now)),
            )

    def journal_add(
        self, txn_id: str, seq: int, resource_id: str, action: str, backup: list[dict[str, Any]]
    ) -> None:
        """Record (durably, before it is applied) one change of the open transaction ``txn_id``.

        Raises:
            StateError: the transaction is unknown or finished, ``seq`` is already used, the backup
                is not JSON-serialisable, or the database cannot be written.
        """
        text = _dumps(backup, f"backup of {resource_id}")
        with self._write("add a journal entry"):
            self._require_open(txn_id)
            try:
                self._conn.execute(
                    "INSERT INTO journal (txn_id, seq, resource_id, action, backup) VALUES (?, ?, ?, ?, ?)",
                    (txn_id, int(seq), resource_id, action, text),
                )
            except sqlite3.IntegrityError as exc:
                raise StateError(f"journal entry {seq} of transaction {txn_id} already exists") from exc

    def journal_done(self, txn_id: str, seq: int) -> None:
        """Mark change ``seq`` of ``txn_id`` as applied.

        The mark is informational (recovery undoes a half-applied change like a finished one), so
        it is committed without its own fsync: it reaches the disk with the next durable commit.

        Raises:
            StateError: no such entry, or the database cannot be written.
        """
        with self._guard("mark a journal entry done"):  # a re-entrant lock: held across the three steps
            self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._write("mark a journal entry done"):
                    cur = self._conn.execute(
                        "UPDATE journal SET done = 1 WHERE txn_id = ? AND seq = ?", (txn_id, int(seq))
                    )
                    if cur.rowcount != 1:
                        raise StateError(f"no journal entry {seq} in transaction {txn_id}")
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")

    def finish_txn(self, txn_id: str, outcome: str, *, now: float | None = None,
                   put: Iterable[Managed] = (), forget: Iterable[str] = ()) -> None:
        """Close transaction ``txn_id`` with ``outcome`` (committed, rolled_back or failed).

        The managed resources ``put`` are recorded and the ids ``forget`` forgotten in the same
        commit (as :meth:`update_managed`), so that a committed release and the resources it
        manages are on disk together or not at all. Finishing again with the same outcome is a
        no-op.

        Raises:
            StateError: unknown outcome or transaction, already finished with another outcome, a
                managed resource is not JSON-serialisable, or the database cannot be written.
        """
        if outcome not in TXN_OUTCOMES:
            raise StateError(f"unknown transaction outcome {outcome!r}")
        rows, gone = _managed_rows(put), [(rid,) for rid in forget]
        with self._write("finish a transaction"):
            row = self._one("SELECT outcome FROM txn WHERE txn_id = ?", (txn_id,))
            if row is None:
                raise StateError(f"no transaction {txn_id}")
            if row[0] is not None:
                if row[0] != outcome:
                    raise StateError(f"transaction {txn_id} already finished as {row[0]}")
                return
            self._conn.execute(
                "UPDATE txn SET outcome = ?, finished_at = ? WHERE txn_id = ?", (outcome, _now(now), txn_id)
            )
            self._store_managed(rows, gone)

    def _require_open(self, txn_id: str) -> None:
        row = self._one("SELECT outcome FROM txn WHERE txn_id = ?", (txn_id,))
        if row is None:
            raise StateError(f"no transaction {txn_id}")
        if row[0] is not None:
            raise StateError(f"transaction {txn_id} is already finished ({row[0]})")

    def open_txn(self) -> OpenTxn | None:
        """Return the interrupted transaction (begun, never finished) with its entries in order.

        Raises:
            StateError: the database cannot be read.
        """
        with self._read("read the open transaction"):
            row = self._one(
                "SELECT txn_id, version, commit_id, begun_at FROM txn WHERE outcome IS NULL"
                " ORDER BY id DESC LIMIT 1"
            )
            if row is None:
                return None
            rows = self._conn.execute(
                "SELECT seq, resource_id, action, backup, done FROM journal WHERE txn_id = ? ORDER BY seq",
                (row[0],),
            ).fetchall()
        entries = tuple(
            JournalEntry(int(seq), rid, action, _loads(backup, "journal backup"), bool(done))
            for seq, rid, action, backup, done in rows
        )
        return OpenTxn(str(row[0]), int(row[1]), str(row[2]), float(row[3]), entries)

    def prune_journal(self, keep: int = 20) -> int:
        """Delete all but the last ``keep`` finished transactions (and their entries); return how many.

        Raises:
            StateError: the database cannot be written.
        """
        with self._write("prune the journal"):
            cur = self._conn.execute(
                "DELETE FROM txn WHERE outcome IS NOT NULL AND id NOT IN"
                " (SELECT id FROM txn WHERE outcome IS NOT NULL ORDER BY id DESC LIMIT ?)",
                (max(int(keep), 0),),
            )
            return int(cur.rowcount)

    def backup_records(self) -> list[dict[str, Any]]:
        """Return every backup record still needed: those of an unfinished transaction (it may have
        to be undone) and the originals of managed resources (prune restores them). Backups of
        finished transactions are history: their blobs, old secret contents among them, may go.

        The engine passes them to :func:`edge_agent.fsafe.referenced_blobs` to clean its blob store.

        Raises:
            StateError: the database cannot be read.
        """
        with self._read("read the backup records"):
            journal = self._conn.execute(
                "SELECT j.backup FROM journal j JOIN txn t ON t.txn_id = j.txn_id WHERE t.outcome IS NULL"
            ).fetchall()
            originals = self._conn.execute(
                "SELECT original FROM managed WHERE original IS NOT NULL"
            ).fetchall()
        records: list[dict[str, Any]] = []
        for (text,) in journal:
            records.extend(r for r in _loads(text, "journal backup") if isinstance(r, dict))
        for (text,) in originals:
            rec = _loads(text, "original record")
            if isinstance(rec, dict):
                records.append(rec)
        return records

    # -- drift and events -----------------------------------------------------------------------

    def add_drift(
        self, resource_id: str, expected: str, found: str, corrected: bool, *, now: float | None = None
    ) -> None:
        """Record one drift finding (the oldest beyond ``max_history`` are dropped).

        Raises:
            StateError: the database cannot be written.
        """
        with self._write("record drift"):
            cur = self._conn.execute(
                "INSERT INTO drift (at, resource_id, expected, found, corrected) VALUES (?, ?, ?, ?, ?)",
                (_now(now), resource_id, expected, found, int(bool(corrected))),
            )
            self._conn.execute(
                "DELETE FROM drift WHERE id <= ?", (int(cur.lastrowid or 0) - self.max_history,)
            )

    def recent_drift(self, limit: int = 100) -> list[DriftFinding]:
        """Return up to ``limit`` drift findings, newest first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read drift"):
            rows = self._conn.execute(
                "SELECT id, at, resource_id, expected, found, corrected FROM drift ORDER BY id DESC LIMIT ?",
                (int(limit),),
            ).fetchall()
        return [DriftFinding(int(i), float(at), rid, exp, fnd, bool(c)) for i, at, rid, exp, fnd, c in rows]

    def add_event(self, kind: str, detail: dict[str, Any], *, now: float | None = None) -> int:
        """Record one event for the local history; return its id (oldest beyond ``max_history`` dropped).

        Raises:
            StateError: ``detail`` is not JSON-serialisable, or the database cannot be written.
        """
        text = _dumps(detail, f"detail of event {kind}")
        with self._write("record an event"):
            cur = self._conn.execute(
                "INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)", (_now(now), kind, text)
            )
            new_id = int(cur.lastrowid or 0)
            self._conn.execute("DELETE FROM events WHERE id <= ?", (new_id - self.max_history,))
            return new_id

    def recent_events(self, limit: int = 100) -> list[Event]:
        """Return up to ``limit`` events, newest first.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read events"):
            rows = self._conn.execute(
                "SELECT id, at, kind, detail FROM events ORDER BY id DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [Event(int(i), float(at), kind, _loads(d, "event detail")) for i, at, kind, d in rows]

    # -- outbox ---------------------------------------------------------------------------------

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
                (topic, bytes(payload), qos, int(bool(retain)), cls, _now(now)),
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

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """Return the value stored under ``key``, or ``None``.

        Raises:
            StateError: the database cannot be read.
        """
        with self._guard("read metadata"):
            row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        """Store ``value`` under ``key``; ``None`` deletes the key.

        Raises:
            StateError: the database cannot be written.
        """
        with self._write("write metadata"):
            if value is None:
                self._conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                    (key, value, value),
                )
