"""The SQLite store's connections: one writer guarded by a lock, a small pool of readers, WAL.

One database file (sqlite-utils on the standard ``sqlite3`` driver) in WAL mode with
``synchronous=NORMAL``: a committed batch survives a crash of the server process, and readers never
block the ingest writer. One connection for writes (the ingest writer, audit, releases, pruning),
guarded by a lock, and a small pool of read connections (the HTTP API, metrics, the rollout runner),
each used by one thread at a time, so that any thread may call any method and an API read never
queues behind another thread's long read. Every ``sqlite3`` error is translated to
:class:`~fleet_server.errors.StoreError`; a value the database cannot hold (an integer over 64 bits,
a broken constraint) to its :class:`~fleet_server.errors.StoreRefused`.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from fleet_server.errors import NotLeader, StoreError, StoreRefused

__all__ = ["SqliteConnections", "insert_or_ignore"]

_READERS = 4
"""Read connections at most (each serves one thread at a time)."""
_WRITER_CACHE_KIB = 16 * 1024
"""Page cache of the write connection (SQLite's default is 2 MiB). A batch of heartbeats updates rows
spread over the whole devices table; with the default cache the pager spills and reads pages back
in the middle of the batch."""
_CHECKPOINT_PAGES = 10_000
"""WAL pages (4 KiB each, about 40 MiB) before a commit checkpoints them into the database file
(SQLite's default is 1,000). One heartbeat batch dirties hundreds of pages across the devices
table; with the default every batch or two is checkpointed and the same hot pages are copied
again each time. Ten times fewer checkpoints copy each hot page once for several batches: 60 %
more heartbeats a second stored by one writer (``bench/bench_ingest_writes.py``)."""
_WAL_KEEP_BYTES = 64 * 1024 * 1024
"""After a checkpoint the WAL file is truncated to at most this size instead of keeping its peak."""


def insert_or_ignore(conn: sqlite3.Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
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


class SqliteConnections:
    """The connections of one SQLite store file; the base of every part of the SQLite store."""

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        """Open the database at ``path`` (creating the file and its directory if needed).

        Raises:
            StoreError: the file cannot be opened.
        """
        self.path = Path(path)
        self._write_lock = threading.Lock()
        # Readers: up to _READERS connections, each used by one thread at a time, so an API read does
        # not queue behind the rollout runner's or the metrics' reads (WAL readers run at once).
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._reader_slots = threading.BoundedSemaphore(_READERS)
        self._pool_lock = threading.Lock()
        self._closed = False
        self._term: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wconn = self._connect()
            self._wconn.execute(f"PRAGMA cache_size=-{_WRITER_CACHE_KIB}")
            self._wconn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
            self._wconn.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_BYTES}")
            self._readers.put(self._connect())
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the fleet database {self.path}: {exc}") from exc
        self._db = sqlite_utils.Database(self._wconn, execute_plugins=False)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _writing(self, what: str, *, begin: bool = True) -> Iterator[None]:
        """Hold the writer for one write transaction, committed at the end (rolled back on error).

        It begins ``IMMEDIATE`` (unless ``begin`` is false: the caller begins its own): the file's
        write lock is taken first, waiting up to the busy timeout for another process's writer (an
        ingest process), so a transaction that reads before it writes (the leadership term check)
        never fails at once with "database is locked" when another process committed in between, as
        a deferred ``BEGIN`` does in WAL mode. A nested ``atomic()`` becomes a savepoint of it.
        """
        with self._write_lock:
            try:
                if begin:
                    self._wconn.execute("BEGIN IMMEDIATE")
                yield
                if begin and self._wconn.in_transaction:
                    self._wconn.commit()
            except (sqlite3.IntegrityError, sqlite3.DataError, OverflowError) as exc:
                self._rollback()
                raise StoreRefused(f"cannot {what} in {self.path}: {exc}") from exc
            except sqlite3.Error as exc:
                self._rollback()
                raise StoreError(f"cannot {what} in {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def fence(self, term: int | None) -> None:
        """Make every later rollout write carry the leadership ``term`` and be refused when the stored
        term is newer (or always, for a negative term: not leading). None: unfenced (tools, tests)."""
        self._term = term

    def take_term(self, holder: str, now: float) -> int:
        """Increment the stored leadership term for ``holder``, fence this store with it and return it.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("take the leadership term"), self._db.atomic():
            self._wconn.execute("UPDATE leader_term SET term = term + 1, holder = ?, since = ? WHERE id = 1",
                                (holder, now))
            row = self._wconn.execute("SELECT term FROM leader_term WHERE id = 1").fetchone()
        term = int(row[0])
        self._term = term
        return term

    def _check_term(self) -> None:
        """Refuse the write in progress (inside the write lock) when this store is fenced with a term
        older than the stored one, or with a negative one."""
        term = self._term
        if term is None:
            return
        row = self._wconn.execute("SELECT term FROM leader_term WHERE id = 1").fetchone()
        stored = 0 if row is None else int(row[0])
        if term < 0 or stored > term:
            raise NotLeader(f"rollout write refused in {self.path}: not the leader "
                            f"(term {term}, stored term {stored})")

    def _rollback(self) -> None:
        if self._wconn.in_transaction:
            self._wconn.rollback()

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._reader_slots:
            if self._closed:
                raise StoreError(f"cannot {what} from {self.path}: the store is closed")
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                try:
                    conn = self._connect()
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot {what} from {self.path}: {exc}") from exc
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"cannot {what} from {self.path}: {exc}") from exc
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
