"""Canary rollouts: plans (``plan``), deterministic membership (``membership``), maintenance windows
(``windows``), gate evaluation (``gates``) and the pure state machine (``engine``).

Everything here is pure; the runner that persists state, publishes ``desired`` messages and feeds
device reports in as events lives elsewhere. See ``docs/rollouts.md``.
"""

from __future__ import annotations

__all__: list[str] = []
