"""The state database's connection: the file, WAL and pragmas, schema migrations, transaction plumbing.

One connection per :class:`Database`, WAL journal, ``synchronous=FULL`` (a commit is on disk when
it returns: the journal and the outbox rely on it), foreign keys on, ``isolation_level=None`` with
explicit ``BEGIN IMMEDIATE`` write transactions, and a schema version table with forward
migrations. Every ``sqlite3`` error is translated to :class:`StateError`. The tables are read and
written by :class:`edge_agent.state.StateDB` and the parts it is made of
(:mod:`edge_agent.state_journal`, :mod:`edge_agent.state_outbox`); this module also holds the small
key/value metadata and the JSON column helpers they share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edge_core.errors import StateError

__all__ = ["SCHEMA_VERSION", "Database", "dumps_json", "loads_json", "now_or"]

log = logging.getLogger(__name__)

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
PAGE_CACHE_KIB = 256
"""The connection's page cache (``PRAGMA cache_size``), in KiB."""


def dumps_json(value: Any, what: str) -> str:
    """Serialise ``value`` for a JSON column (sorted keys, compact); StateError names ``what``."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{what} is not JSON-serialisable: {exc}") from exc


def loads_json(text: str, what: str) -> Any:
    """Decode a stored JSON column; StateError names ``what`` when it is not valid JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StateError(f"stored {what} is not valid JSON") from exc


def now_or(now: float | None) -> float:
    """Return ``now``, or the wall clock when it is ``None`` (writers take ``now=`` to pin time)."""
    return time.time() if now is None else now


class Database:
    """The agent's SQLite connection. Thread-safe (one connection behind a lock); close when done."""

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
            # A page cache of 256 KiB instead of SQLite's 2 MiB: the daemon keeps this connection
            # for its lifetime, on a 40 MB budget, and with SQLite's default a 500-file sync --once
            # peaks 0.1-0.3 MiB higher (bench.bench_footprint, docs/benchmarks.md). The database is
            # small and the OS page cache holds it anyway.
            self._conn.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
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

    def __enter__(self) -> Self:
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
