"""A read answer recomputed at most every few seconds, in the background, so that no request waits
for it after the first.

``GET /api/v1/summary`` counts the whole fleet (one scan of a covering index: about 25 ms at
100,000 devices on an idle machine, several times that while the rollout runner and the ingest
writer share the CPU). The dashboard polls it every few seconds from every open page; answering
from a copy at most ``ttl`` seconds old keeps each answer to a dictionary copy. When the copy is
older than ``ttl`` the request that notices starts one refresh thread and still answers the old
copy; only the very first request (no copy yet), or one that finds the copy older than
``max_stale`` (the refreshes keep failing), computes in line, so a broken store still answers 503
instead of stale numbers forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_core.errors import StateError

__all__ = ["CachedRead"]

log = logging.getLogger(__name__)


class CachedRead:
    """Serves ``compute()`` from a copy refreshed in the background once it is ``ttl`` seconds old.

    The answer gets an ``as_of`` key: the POSIX time the copy was computed.

    Args:
        compute: the read (raises StateError when the store cannot be read).
        ttl: seconds a copy is served before a refresh starts.
        max_stale: seconds after which a request computes in line instead of answering the copy.
        clock: returns POSIX time (injected by tests).
    """

    def __init__(self, compute: Callable[[], dict[str, Any]], *, ttl: float = 2.0, max_stale: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._compute = compute
        self._ttl = ttl
        self._max_stale = max_stale
        self._clock = clock
        self._lock = threading.Lock()
        self._copy: tuple[float, dict[str, Any]] | None = None
        self._refreshing = False

    def _fresh(self) -> tuple[float, dict[str, Any]]:
        at = self._clock()
        value = {**self._compute(), "as_of": at}
        with self._lock:
            if self._copy is None or self._copy[0] <= at:
                self._copy = (at, value)
        return at, value

    def _refresh(self) -> None:
        try:
            self._fresh()
        except StateError as exc:
            log.warning("cannot refresh a cached read (the old copy is served): %s", exc)
        finally:
            with self._lock:
                self._refreshing = False

    def get(self) -> dict[str, Any]:
        """Return the cached answer, starting a background refresh when it is ``ttl`` seconds old.

        Raises:
            StateError: there is no usable copy and the store cannot be read.
        """
        now = self._clock()
        with self._lock:
            copy = self._copy
            age = None if copy is None else now - copy[0]
            if copy is not None and age is not None and 0 <= age < self._ttl:
                return dict(copy[1])
            background = copy is not None and age is not None and 0 <= age < self._max_stale
            if background and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="cached-read", daemon=True).start()
        if background and copy is not None:
            return dict(copy[1])
        return dict(self._fresh()[1])
