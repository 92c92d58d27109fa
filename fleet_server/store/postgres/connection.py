"""The PostgreSQL store's connections: a psycopg 3 pool, one writer at a time.

Reads take any connection of the pool (autocommit: a read holds no transaction open). Writes are
serialised by a lock and each runs in one transaction on a pooled connection: rows get their ids
(``events``, ``health``) and registry changes their ``seq`` in commit order, which the rollout
runner's cursors rely on (it reads "everything after the last id it saw"), as with SQLite's single
writer. Each connection is checked as it leaves the pool (one empty round trip) and replaced when
the server closed or lost it, so a database restart costs no failed request once it is back; a
write that fails anyway stores nothing and raises, so the ingest writer retries it. Opening the
store makes one plain connection first, so that a refused login or an unreachable server is
reported at once with the server's own reason, instead of the pool's retrying until its timeout.

Every psycopg or pool error is translated to :class:`~fleet_server.errors.StoreError`; a value the
database refuses (out of range, a broken constraint) to its :class:`~fleet_server.errors.StoreRefused`.
The password never appears in a message: it is not in the URL (the configuration refuses that).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from fleet_server.errors import NotLeader, StoreError, StoreRefused

__all__ = ["PgConnection", "PgConnections"]

PgConnection = psycopg.Connection[DictRow]

_POOL_SIZE = 5
"""Connections at most: one writer and readers for the API, metrics and the rollout runner."""
_WAIT = 30.0
"""Seconds to wait for a pooled connection (or for the first one when opening)."""


class PgConnections:
    """The connection pool of one PostgreSQL store; the base of every part of the PostgreSQL store."""

    backend = "postgresql"

    def __init__(self, url: str, password: str | None) -> None:
        """Connect to the database at ``url`` (``password`` from ``store.password_file``).

        Raises:
            StoreError: the database cannot be reached or refuses the login.
        """
        self.where = url
        self._write_lock = threading.Lock()
        self._closed = False
        self._term: int | None = None
        kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row, "connect_timeout": 10,
                                  "application_name": "fleet-server"}
        if password is not None:
            kwargs["password"] = password
        try:
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the fleet database {self.where}: {_reason(exc)}") from exc
        self._pool: ConnectionPool[PgConnection] = ConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=_POOL_SIZE, open=False, timeout=_WAIT,
            check=ConnectionPool.check_connection, name="fleet-store")
        try:
            self._pool.open(wait=True, timeout=_WAIT)
        except (psycopg.Error, PoolTimeout) as exc:
            self._pool.close()
            raise StoreError(f"cannot open the fleet database {self.where}: {_reason(exc)}") from exc

    @contextmanager
    def _writing(self, what: str) -> Iterator[PgConnection]:
        with self._write_lock:
            if self._closed:
                raise StoreError(f"cannot {what} in {self.where}: the store is closed")
            try:
                with self._pool.connection() as conn, conn.transaction():
                    yield conn
            except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
                raise StoreRefused(f"cannot {what} in {self.where}: {_reason(exc)}") from exc
            except (psycopg.Error, PoolTimeout) as exc:
                raise StoreError(f"cannot {what} in {self.where}: {_reason(exc)}") from exc

    def fence(self, term: int | None) -> None:
        """Make every later rollout write carry the leadership ``term`` and be refused when the stored
        term is newer (or always, for a negative term: not leading). None: unfenced (tools, tests)."""
        self._term = term

    def _check_term(self, conn: PgConnection) -> None:
        """Refuse the write in progress (inside its transaction) when this store is fenced with a term
        older than the stored one, or with a negative one. The row is read ``FOR SHARE``: a replica
        taking the leadership (``UPDATE leader_term``) waits for this transaction, and this one for
        it, so a write commits either before the new term exists or not at all."""
        term = self._term
        if term is None:
            return
        if term < 0:
            raise NotLeader(f"rollout write refused in {self.where}: this replica is not the leader")
        row = conn.execute("SELECT term FROM leader_term WHERE id = 1 FOR SHARE").fetchone()
        stored = 0 if row is None else int(row["term"])
        if stored > term:
            raise NotLeader(f"rollout write refused in {self.where}: leadership term {term} is over, "
                            f"another replica leads with term {stored}")

    @contextmanager
    def _reading(self, what: str) -> Iterator[PgConnection]:
        if self._closed:
            raise StoreError(f"cannot {what} from {self.where}: the store is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreError(f"cannot {what} from {self.where}: {_reason(exc)}") from exc

    def close(self) -> None:
        """Close every connection (idempotent)."""
        with self._write_lock:
            self._closed = True
            self._pool.close()


def _reason(exc: Exception) -> str:
    """The first line of a driver error (PostgreSQL's own messages may add DETAIL lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
