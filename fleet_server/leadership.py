"""Which replica leads: the one holding the store's leader lock runs the leader's duties (the
rollout runner, the Git watcher, the ``desired`` and baseline publisher); the others only serve the
API and ingest.

A follower tries to take the lock every ``leader.lease`` seconds. The leader checks every third of
the lease that it still holds it; the moment it does not, it fences its store with a negative term
(every rollout write refused) and only then stops its duties, so nothing it still had in flight can
be written. Each taking of the lock gives a new, higher term, with which the store fences every
rollout write: a leader that was paused or cut off and comes back cannot write over its successor's
work (see ``docs/scale-out.md``).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from fleet_server.errors import FleetError

__all__ = ["Duties", "LeaderLock", "Leadership"]

log = logging.getLogger(__name__)

_NOT_LEADING = -1


class LeaderLock(Protocol):
    """A store's leader lock, as one replica sees it."""

    @property
    def held(self) -> bool:
        """True while this replica holds the lock."""
        ...

    def try_take(self) -> int | None:
        """Try once; return the new leadership term when taken, None otherwise."""
        ...

    def still_held(self) -> bool:
        """Check (one round trip) that the lock is still held."""
        ...

    def release(self) -> None:
        """Give the lock up."""
        ...


class Fenced(Protocol):
    """A store whose rollout writes carry a leadership term."""

    def fence(self, term: int | None) -> None:
        """Fence every later rollout write with ``term``."""
        ...


class Duties(Protocol):
    """What only the leader runs."""

    def start(self) -> None:
        """Start the leader's parts."""
        ...

    def stop(self) -> None:
        """Stop them (bounded, idempotent)."""
        ...


class Leadership:
    """Takes, keeps and loses the leadership of one replica, in a thread, and runs the duties while
    leading."""

    def __init__(self, lock: LeaderLock, store: Fenced, duties: Duties, *, lease: float) -> None:
        """Lead through ``lock``, fencing ``store``, running ``duties``; retry every ``lease`` seconds."""
        self._lock = lock
        self._store = store
        self._duties = duties
        self._lease = lease
        self._term: int | None = None
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        store.fence(_NOT_LEADING)

    @property
    def role(self) -> str:
        """``leader`` or ``follower``."""
        return "leader" if self._term is not None else "follower"

    @property
    def term(self) -> int | None:
        """The term this replica leads with, None while following."""
        return self._term

    def start(self) -> None:
        """Try to lead once now, then keep trying (or checking) in a background thread."""
        self._attempt()
        self._thread = threading.Thread(target=self._run, name="leadership", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            leading = self._term is not None
            if self._stop.wait(self._lease / 3 if leading else self._lease):
                return
            if leading:
                if not self._lock.still_held():
                    self._lose("the leader lock's session is gone")
            else:
                self._attempt()

    def _attempt(self) -> None:
        term = self._lock.try_take()
        if term is None:
            return
        with self._state:
            self._store.fence(term)
            self._term = term
            log.info("leadership taken (term %s): starting the rollout runner, Git watcher and publisher",
                     term)
            try:
                self._duties.start()
            except FleetError as exc:
                log.error("leader duties failed to start, leadership given up: %s", exc)
                self._lose_locked("the duties failed to start")
                self._lock.release()

    def _lose(self, why: str) -> None:
        with self._state:
            self._lose_locked(why)

    def _lose_locked(self, why: str) -> None:
        if self._term is None:
            return
        self._store.fence(_NOT_LEADING)  # first: nothing still in flight may write
        log.warning("leadership lost (term %s): %s; following", self._term, why)
        self._term = None
        self._duties.stop()

    def stop(self) -> None:
        """Stop trying, stop the duties and give the lock up (bounded)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10.0)
        self._lose("stopping")
        self._lock.release()
