"""The agent's local state in SQLite: the only place on the device that speaks SQL.

:class:`StateDB` is the state database: its connection and schema (:mod:`edge_agent.state_db`), the
transaction journal (:mod:`edge_agent.state_journal`) and the outbox (:mod:`edge_agent.state_outbox`)
are its parts; this module adds the installed release, the rollback floor and trust root, the managed
resources (with the backup record of what was there before the agent took a path over), drift
findings and an event history for ``status``. Secret plaintext must never be passed in: specs and
details are stored as is.

Timestamps default to ``time.time()``; every writer takes ``now=`` so callers and tests can pin it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.state_db import dumps_json, loads_json, now_or
from edge_agent.state_journal import TXN_OUTCOMES, JournalTables
from edge_agent.state_outbox import OutboxTables
from edge_core.errors import StateError

__all__ = ["DriftFinding", "Event", "Installed", "Managed", "StateDB"]


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
            self._spec = loads_json(self._spec_text or "", f"spec of {self.resource_id}")
        return self._spec

    @property
    def original(self) -> dict[str, Any] | None:
        """The capture record of what was at the path before the agent managed it, if anything."""
        if self._original is None and self._original_text is not None:
            self._original = loads_json(self._original_text, f"original of {self.resource_id}")
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




def _managed_rows(put: Iterable[Managed]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``put``, each serialised as it is written (500 resources' JSON is never held at once)."""
    for m in put:
        yield (m.resource_id, m.kind, dumps_json(m.spec, f"spec of {m.resource_id}"), m.digest,
               None if m.original is None else dumps_json(m.original, f"original of {m.resource_id}"),
               float(m.first_managed_at))



class StateDB(JournalTables, OutboxTables):
    """The agent's state database. Thread-safe (one connection behind a lock); close when done.

    Opened as :class:`edge_agent.state_db.Database` (creating and migrating the file); the journal
    and outbox methods come from their parts.
    """

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
        bundles = loads_json(row[3], "bundle list")
        return Installed(int(row[0]), str(row[1]), float(row[2]), tuple(str(b) for b in bundles))

    def set_installed(
        self, version: int, commit: str, bundles: Iterable[str], *, now: float | None = None
    ) -> None:
        """Record the release now installed.

        Raises:
            StateError: the database cannot be written.
        """
        text = dumps_json(list(bundles), "bundle list")
        with self._write("record the installed release"):
            self._conn.execute(
                "INSERT OR REPLACE INTO installed (id, version, commit_id, applied_at, bundles)"
                " VALUES (1, ?, ?, ?, ?)",
                (int(version), commit, now_or(now), text),
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
        doc = loads_json(text, "trust root")
        if not isinstance(doc, dict):
            raise StateError("stored trust root is not a JSON object")
        return doc

    def set_trust_root(self, doc: dict[str, Any]) -> None:
        """Store the trust root document (replacing the previous one).

        Raises:
            StateError: not JSON-serialisable, or the database cannot be written.
        """
        text = dumps_json(doc, "trust root")
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
        rows, gone = list(put), [(rid,) for rid in forget]
        if not rows and not gone:
            return
        with self._write("record the managed resources"):
            self._store_managed(rows, gone)

    def _store_managed(self, put: Sequence[Managed], gone: list[tuple[str]]) -> None:
        """Write ``put`` (a resource that is not JSON-serialisable raises StateError and the
        transaction writes nothing) and delete ``gone``."""
        self._conn.executemany(
            "INSERT OR REPLACE INTO managed (resource_id, kind, spec, digest, original, first_managed_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", _managed_rows(put),
        )
        self._conn.executemany("DELETE FROM managed WHERE resource_id = ?", gone)

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
        rows, gone = list(put), [(rid,) for rid in forget]
        with self._write("finish a transaction"):
            row = self._one("SELECT outcome FROM txn WHERE txn_id = ?", (txn_id,))
            if row is None:
                raise StateError(f"no transaction {txn_id}")
            if row[0] is not None:
                if row[0] != outcome:
                    raise StateError(f"transaction {txn_id} already finished as {row[0]}")
                return
            self._conn.execute(
                "UPDATE txn SET outcome = ?, finished_at = ? WHERE txn_id = ?", (outcome, now_or(now), txn_id)
            )
            self._store_managed(rows, gone)

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
                (now_or(now), resource_id, expected, found, int(bool(corrected))),
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
        text = dumps_json(detail, f"detail of event {kind}")
        with self._write("record an event"):
            cur = self._conn.execute(
                "INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)", (now_or(now), kind, text)
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
        return [Event(int(i), float(at), kind, loads_json(d, "event detail")) for i, at, kind, d in rows]
