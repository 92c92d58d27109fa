"""The leader lock of replicas sharing one PostgreSQL store: a session advisory lock
(``pg_try_advisory_lock``) held on a dedicated connection, outside the pool, and the leadership term
taken in the same step.

Taking the lock increments ``leader_term`` (``UPDATE ... RETURNING term``) on that connection; the
term fences every rollout write of the store (see ``PgConnections.fence``). PostgreSQL releases a
session lock when the session ends: at once when the process dies (its socket closes), and, for a
process that is paused or cut off from the database, after ``idle_session_timeout``, which the
leader sets to the lease on its own session and keeps from firing by a round trip every third of
the lease. TCP keepalives and ``tcp_user_timeout`` bound how long a round trip to an unreachable
server can block, so a leader that loses its connection learns it within about one lease.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg

from fleet_server.errors import StoreError
from fleet_server.store.postgres.connection import _reason

__all__ = ["LEADER_LOCK_KEY", "PgLeaderLock"]

log = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x666C656574_01
"""The advisory lock key of the leadership ("fleet" and 1; the schema lock is "fleet")."""


class PgLeaderLock:
    """The leader lock on one PostgreSQL store, for one replica (not thread-safe: one caller)."""

    def __init__(self, url: str, password: str | None, *, lease: float, holder: str) -> None:
        """Prepare the lock of the database at ``url`` for the replica named ``holder`` (its host and
        pid, recorded with the term); nothing is connected before :meth:`try_take`."""
        self.where = url
        self._lease = lease
        self._holder = holder
        secs = max(1, int(lease))
        self._kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": secs, "application_name": "fleet-server-leader",
            "keepalives": 1, "keepalives_idle": secs, "keepalives_interval": 1, "keepalives_count": 2,
            "tcp_user_timeout": int(lease * 1000)}
        if password is not None:
            self._kwargs["password"] = password
        self._conn: psycopg.Connection[Any] | None = None
        self._held = False

    @property
    def held(self) -> bool:
        """True while this replica holds the lock (as far as it last knew)."""
        return self._held

    def try_take(self) -> int | None:
        """Try once to take the lock; return the new leadership term when taken, None when another
        replica holds it or the database cannot be reached (logged)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.where, **self._kwargs)
            conn = self._conn
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()
            if row is None or not row[0]:
                return None
            with conn.transaction():
                found = conn.execute("UPDATE leader_term SET term = term + 1, holder = %s, since = %s"
                                     " WHERE id = 1 RETURNING term", (self._holder, time.time())).fetchone()
            if found is None:
                raise StoreError(f"{self.where}: the leader_term row is missing")
            # A paused or partitioned leader's session ends after one lease: its lock is released.
            conn.execute(f"SET idle_session_timeout = {int(self._lease * 1000)}")
            self._held = True
            return int(found[0])
        except (psycopg.Error, StoreError) as exc:
            log.warning("leader lock: cannot take it in %s: %s", self.where, _reason(exc))
            self._drop()
            return None

    def still_held(self) -> bool:
        """Make one round trip on the lock's session; return False (and forget the session) when it is
        gone, which means PostgreSQL released the lock."""
        if not self._held or self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error as exc:
            log.warning("leader lock: session lost in %s: %s", self.where, _reason(exc))
            self._drop()
            return False

    def release(self) -> None:
        """Give the lock up by ending its session (idempotent)."""
        self._drop()

    def _drop(self) -> None:
        self._held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # already broken: nothing more to release
                conn.close()
