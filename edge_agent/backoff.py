"""Capped exponential backoff with full jitter, for retrying fetches and broker connections.

The n-th delay (n counting from 0) is drawn uniformly from ``[0, min(cap, base * 2**n)]``: the
"full jitter" scheme, which spreads the retries of many devices that lost the mirror at the same
moment instead of having them return in lock-step. The class only computes delays; the caller
sleeps (or waits on an event), so it is pure given its random source.
"""

from __future__ import annotations

import random

__all__ = ["Backoff", "ceiling"]


def ceiling(base: float, cap: float, attempt: int) -> float:
    """Return the delay ceiling of retry number ``attempt`` (from 0): ``min(cap, base * 2**attempt)``."""
    # 2**attempt overflows a float near attempt 1024; the cap is reached long before that.
    return min(cap, base * 2.0 ** min(max(attempt, 0), 1023))


class Backoff:
    """Delays for successive retries: ``uniform(0, min(cap, base * 2**attempt))``.

    Args:
        base: the ceiling of the first delay, in seconds (> 0).
        cap: the largest ceiling any delay may have, in seconds (>= base).
        rng: the random source; pass a seeded ``random.Random`` for reproducible delays.

    Raises:
        ValueError: base is not positive or cap is smaller than base.
    """

    def __init__(self, *, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> None:
        if not base > 0:
            raise ValueError(f"backoff base must be positive, got {base}")
        if not cap >= base:
            raise ValueError(f"backoff cap {cap} is smaller than its base {base}")
        self._base = float(base)
        self._cap = float(cap)
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """The number of delays handed out since construction or the last reset()."""
        return self._attempt

    def ceiling(self) -> float:
        """Return the upper bound of the next delay: ``min(cap, base * 2**attempt)``."""
        return ceiling(self._base, self._cap, self._attempt)

    def next_delay(self) -> float:
        """Return the next delay in seconds (drawn with full jitter) and count the attempt."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start over after a success: the next delay is drawn from ``[0, base]`` again."""
        self._attempt = 0
