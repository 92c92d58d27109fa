"""The one bounded wait of the tests: poll a condition, raise with a reason on timeout."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["WaitTimeout", "wait_until"]


class WaitTimeout(TimeoutError):
    """A condition a test waited for did not hold in time."""


def wait_until(cond: Callable[[], object], what: str, timeout: float = 15.0, step: float = 0.05) -> None:
    """Return once ``cond()`` is true; raise :class:`WaitTimeout` naming ``what`` after ``timeout`` s.

    Bounded twice: by the monotonic clock and by the number of polls (``timeout / step`` + 1), so a
    condition that is slow to evaluate cannot stretch the wait either.
    """
    deadline = time.monotonic() + timeout
    for _ in range(max(1, math.ceil(timeout / step)) + 1):
        if cond():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    if cond():
        return
    raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
