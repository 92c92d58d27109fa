"""What the rollout runner keeps per rollout it drives, and per registry row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .model import RolloutState

__all__ = ["Live", "Registry"]

Registry = tuple[bool | None, Any, bool | None]
"""What the runner keeps of a registry row: (online, release, paused)."""


@dataclass
class Live:
    """One rollout the runner drives, with what it last persisted."""

    state: RolloutState
    actor: str
    reason: str
    created: float
    last_counts: list[dict[str, int]]
    dirty: bool = True
    #: devices changed since the last write; every device when ``all_devices``
    dirty_devices: set[str] = field(default_factory=set)
    all_devices: bool = False
    updated: float = 0.0
