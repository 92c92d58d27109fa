"""A daemon thread that calls one ``tick`` every few seconds until stopped: the loop the rollout
runner and the leader's preflight duty share.

An expected failure of a tick (the store cannot be read or written, say) is logged as an error and
tried again at the next tick; any other exception is a bug, logged with its traceback, and does not
end the loop either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Ticker"]


class Ticker:
    """Calls ``tick`` every ``interval`` seconds in a daemon thread named ``name`` between
    :meth:`start` and :meth:`stop`.

    Args:
        name: the thread's name, and the prefix of its log lines.
        tick: one round of work.
        interval: seconds between the end of one tick and the start of the next.
        expected: the exceptions a tick may raise when something outside it fails (logged as errors).
        log: the logger of the module that owns the loop.
        join_timeout: seconds :meth:`stop` waits for the tick under way to end.
    """

    def __init__(self, name: str, tick: Callable[[], object], interval: float, *,
                 expected: tuple[type[Exception], ...], log: logging.Logger,
                 join_timeout: float = 10.0) -> None:
        self._name = name
        self._tick = tick
        self._interval = interval
        self._expected = expected
        self._log = log
        self._join_timeout = join_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (the first tick comes one interval later)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, waiting (bounded) for the tick under way. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._join_timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except self._expected as exc:
                self._log.error("%s: tick failed (tried again next tick): %s", self._name, exc)
            except Exception:  # noqa: BLE001 - a bug must not end the loop; logged with its traceback
                self._log.exception("%s: tick failed unexpectedly", self._name)
