"""The transaction journal in the state database: every change recorded before it is applied.

A transaction is begun for one release, each planned change is journaled durably with the backup
records taken before it, marked done once applied, and the transaction is finished with its outcome
(:meth:`edge_agent.state.StateDB.finish_txn`, in the same commit as the managed resources). A
transaction begun and never finished is what recovery undoes on the next start.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from edge_agent.state_db import Database, dumps_json, loads_json, now_or
from edge_core.errors import StateError

__all__ = ["TXN_OUTCOMES", "JournalEntry", "JournalTables", "OpenTxn"]

TXN_OUTCOMES = ("committed", "rolled_back", "failed")


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




class JournalTables(Database):
    """The journal's part of the state database (the ``txn`` and ``journal`` tables)."""

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
                (txn_id, int(version), commit, now_or(now)),
            )

    def journal_add(
        self, txn_id: str, seq: int, resource_id: str, action: str, backup: list[dict[str, Any]]
    ) -> None:
        """Record (durably, before it is applied) one change of the open transaction ``txn_id``.

        Raises:
            StateError: the transaction is unknown or finished, ``seq`` is already used, the backup
                is not JSON-serialisable, or the database cannot be written.
        """
        text = dumps_json(backup, f"backup of {resource_id}")
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
            JournalEntry(int(seq), rid, action, loads_json(backup, "journal backup"), bool(done))
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

        The engine passes them to :func:`edge_agent.fsafe_backup.referenced_blobs` to clean its blob store.

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
            records.extend(r for r in loads_json(text, "journal backup") if isinstance(r, dict))
        for (text,) in originals:
            rec = loads_json(text, "original record")
            if isinstance(rec, dict):
                records.append(rec)
        return records
