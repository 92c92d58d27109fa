"""What the agent's operations return: the result of one sync and of one drift check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.engine.drift import DriftFinding

__all__ = ["FAILURES", "DriftReport", "SyncResult"]

FAILURES = frozenset({"refused", "failed", "rolled_back", "fetch_failed"})
"""The sync outcomes that are failures: reported once per commit and reason, then counted."""


@dataclass(frozen=True)
class SyncResult:
    """What one sync did; ``reason`` and ``step`` say why when it did not apply.

    ``repeat_count`` is how many syncs in a row ended with this same failure for this same commit
    (1: the first, which is the one reported as an event); ``held`` is True when the release was not
    applied again because it already failed here (see ``docs/agent-config.md``);
    ``health_failed`` is True when it was rolled back because a health check failed. ``origin`` is
    ``file`` for a release imported from a bundle file (``edge-agent import``), None for the mirror.
    """

    outcome: str
    version: int | None = None
    commit: str | None = None
    reason: str | None = None
    step: str | None = None
    changes: int = 0
    repeat_count: int = 0
    held: bool = False
    health_failed: bool = False
    origin: str | None = None


@dataclass(frozen=True)
class DriftReport:
    """What a drift check found and whether it was corrected (``outcome`` of the correction)."""

    findings: tuple[DriftFinding, ...]
    corrected: bool
    outcome: str | None = None
