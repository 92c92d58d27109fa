"""The PostgreSQL store's record of who did what (the audit log) and of the signed releases the Git
watcher verified.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.store.postgres.connection import PgConnections
from fleet_server.store.records import from_json, request_count, to_json

__all__ = ["PgAudit"]

log = logging.getLogger(__name__)


class PgAudit(PgConnections):
    """The audit log and the recorded releases of the PostgreSQL store."""

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Append one entry to the audit log (who did what to which target, and why).

        Raises:
            StoreError: the database cannot be written.
        """
        at = time.time() if now is None else now
        with self._writing("append to the audit log") as conn:
            conn.execute("INSERT INTO audit (at, actor, action, target, reason, detail)"
                         " VALUES (%s, %s, %s, %s, %s, %s)",
                         (at, actor, action, target, reason, to_json(dict(detail) if detail else None)))

    def audit(self, limit: int = 100, *, action: str | None = None,
              before: int | None = None) -> list[dict[str, Any]]:
        """Return the newest audit entries first (only those of ``action`` when given, and only those
        with an id below ``before`` when given: the next page of the log).

        Raises:
            StoreError: the database cannot be read.
        """
        below = 2**63 - 1 if before is None else int(before)
        with self._reading("read the audit log") as conn:
            if action is None:
                rows = conn.execute("SELECT * FROM audit WHERE id < %s ORDER BY id DESC LIMIT %s",
                                    (below, max(0, int(limit)))).fetchall()
            else:
                rows = conn.execute("SELECT * FROM audit WHERE action = %s AND id < %s ORDER BY id DESC"
                                    " LIMIT %s", (action, below, max(0, int(limit)))).fetchall()
        return [{**r, "detail": from_json(r["detail"])} for r in rows]

    def record_release(self, version: int, commit: str, signers: Sequence[str], seen_at: float, *,
                       committed_at: float | None = None) -> bool:
        """Record a verified signed release; return False when that version is already known.

        ``committed_at`` is the commit's time (for commit-to-applied); events already stored for the
        commit get it too.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("record a release") as conn:
            cur = conn.execute(
                'INSERT INTO releases (version, "commit", signers, seen_at, committed_at)'
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (int(version), commit, to_json(sorted(signers)), seen_at, committed_at))
            added = cur.rowcount == 1
            if added and committed_at is not None:
                conn.execute('UPDATE events SET committed_at = %s WHERE "commit" = %s'
                             " AND committed_at IS NULL",
                             (committed_at, commit))
        if added:
            log.info("release %s (commit %s) recorded", version, commit)
        return added

    def releases(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return the newest recorded releases first.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read releases") as conn:
            rows = conn.execute("SELECT * FROM releases ORDER BY version DESC LIMIT %s",
                                (max(0, int(limit)),)).fetchall()
        return [{**r, "signers": from_json(r["signers"]) or []} for r in rows]

    def release_commit(self, version: int) -> str | None:
        """Return the commit of a recorded signed release, or None when it is unknown.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read a release") as conn:
            row = conn.execute('SELECT "commit" FROM releases WHERE version = %s', (int(version),)).fetchone()
        return None if row is None else str(row["commit"])

    def request_git_poll(self) -> None:
        """Count one more Git poll request (see :meth:`git_poll_requests`).

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("request a Git poll") as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES ('git_poll_requests', '1')"
                         " ON CONFLICT (key) DO UPDATE SET value = (meta.value::bigint + 1)::text")

    def git_poll_requests(self) -> int:
        """Return how many Git polls were requested through the store so far (0 when none was, or
        when the stored count is unreadable).

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading("read the Git poll requests") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'git_poll_requests'").fetchone()
        return 0 if row is None else request_count(row["value"])
