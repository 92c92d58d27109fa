"""One process owns a SQLite store: an exclusive ``flock`` on ``<database>.lock`` beside the file,
held for the life of the server, and the leader lock of that single process.

Why a lock file and not an ownership row: the kernel releases a ``flock`` when its process ends in
any way (SIGKILL and power loss included), so a crashed server never leaves a stale owner behind for
an operator to clear, and a second server learns at once, without waiting for a timeout, that the
file is in use.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO, Protocol

from fleet_server.errors import StoreError

__all__ = ["SqliteLeaderLock", "SqliteOwner"]


class SqliteOwner:
    """The exclusive lock file of one SQLite store, taken by :meth:`claim`."""

    def __init__(self, database: Path) -> None:
        """Prepare the lock of the database file ``database`` (``<database>.lock``)."""
        self.path = Path(f"{database}.lock")
        self._file: IO[str] | None = None

    def claim(self) -> None:
        """Take the lock, writing this process's pid into the lock file.

        Raises:
            StoreError: another process holds it, or the lock file cannot be opened.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read(32).strip() or "unknown"
            f.close()
            raise StoreError(f"fleet database {str(self.path)[:-5]} is in use by another fleet-server "
                             f"(pid {owner}): one process owns a SQLite store") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        f, self._file = self._file, None
        if f is not None:
            f.close()


class _TermStore(Protocol):
    def take_term(self, holder: str, now: float) -> int: ...


class SqliteLeaderLock:
    """The leader lock of a SQLite store's only process: always taken, never lost (the
    :class:`SqliteOwner` lock keeps every other process out)."""

    def __init__(self, store: _TermStore, holder: str) -> None:
        """Lead ``store`` as ``holder``."""
        self._store = store
        self._holder = holder
        self._held = False

    @property
    def held(self) -> bool:
        """True once taken."""
        return self._held

    def try_take(self) -> int | None:
        """Take the leadership: increment the stored term and return it (None when the store fails)."""
        try:
            term = self._store.take_term(self._holder, time.time())
        except StoreError:
            return None
        self._held = True
        return term

    def still_held(self) -> bool:
        """True once taken: nothing else can take a SQLite store's leadership."""
        return self._held

    def release(self) -> None:
        """Forget the leadership (the owner lock is released separately)."""
        self._held = False
