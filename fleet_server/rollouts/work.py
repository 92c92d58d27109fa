"""The mutable view of a rollout state for the length of one engine step (see :mod:`.engine`)."""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .devicemap import DeviceMap
from .index import Derived, FleetIndex
from .model import Audit, DeviceStatus, Effect, Phase, PhaseChanged, RolloutState
from .plan import RolloutPlan

__all__ = ["ACTION_MEMORY", "RATE_PERIOD", "DeriveFactory", "Probe", "Work", "evolve"]

log = logging.getLogger("fleet_server.rollouts.engine")

ACTION_MEMORY = 64
RATE_PERIOD = 60.0

DeriveFactory = Callable[[RolloutState], Derived]
"""Returns the derived quantities of a state's devices, for one step to update (see :mod:`.index`)."""


T = TypeVar("T")


def evolve(value: T, **changes: Any) -> T:
    """``dataclasses.replace`` for the engine's own frozen values (every name in ``changes`` is a
    field): a copy of the instance dict, without re-running ``__init__``."""
    new = object.__new__(type(value))
    new.__dict__.update(value.__dict__)
    new.__dict__.update(changes)
    return new


class Recent:
    """The times of the assignments of the last minute: the state's tuple until a step appends."""

    def __init__(self, times: tuple[float, ...]) -> None:
        self._tuple: tuple[float, ...] | None = times
        self._list: list[float] = []

    def __len__(self) -> int:
        return len(self._tuple) if self._tuple is not None else len(self._list)

    def append(self, at: float) -> None:
        if self._tuple is not None:
            self._list, self._tuple = list(self._tuple), None
        self._list.append(at)

    def value(self) -> tuple[float, ...]:
        return self._tuple if self._tuple is not None else tuple(self._list)


class Probe:
    """What :func:`_report` needs of a step, to tell whether a report would change its device."""

    def __init__(self, s: RolloutState, now: float) -> None:
        self.s, self.now, self.wave, self.plan = s, max(s.clock, now), s.wave, s.plan
        self.changed = False

    def get(self, device: str) -> DeviceStatus | None:
        return self.s.devices.get(device)

    def update(self, device: str, **changes: Any) -> bool:
        current = self.s.devices[device]
        self.changed = evolve(current, **changes) != current
        return self.changed


class Work:
    """A mutable view of the state for the length of one step: the devices it changed (over the
    state's unchanged map), the index it keeps up to date, and the effects it produced."""

    def __init__(self, s: RolloutState, now: float, derive: DeriveFactory) -> None:
        self.s = s
        self.now = max(s.clock, now)
        self.phase: Phase = s.phase
        self.wave = s.wave
        self.base: Mapping[str, DeviceStatus] = s.devices
        self.changed: dict[str, DeviceStatus] = {}
        self.index = derive(s)
        if isinstance(self.index, FleetIndex):
            self.index.owner = None  # updated by this step: describes no map until frozen
        self.waves = list(s.waves)
        self.gates = list(s.gates)
        self.halted_reason = s.halted_reason
        self.tripped = s.tripped
        self.paused_from = s.paused_from
        cutoff = self.now - RATE_PERIOD
        recent = s.recent_assignments  # ascending: appended at the step's clock, which never goes back
        if recent and recent[0] <= cutoff:
            recent = recent[bisect_right(recent, cutoff):]
        self.recent = Recent(recent)
        self.rollback_started = s.rollback_started
        self.superseded_by = s.superseded_by
        self.superseded_at = s.superseded_at
        self.seen_actions = list(s.seen_actions)
        self.effects: list[Effect] = []

    def freeze(self) -> RolloutState:
        devices = self.s.devices
        if self.changed:
            devices = DeviceMap.of(devices).evolve(self.changed)
        if isinstance(self.index, FleetIndex):
            self.index.owner = devices
        return evolve(self.s, phase=self.phase, wave=self.wave, devices=devices,
                       waves=tuple(self.waves),
                       gates=tuple(self.gates), halted_reason=self.halted_reason, tripped=self.tripped,
                       paused_from=self.paused_from, clock=self.now, recent_assignments=self.recent.value(),
                       rollback_started=self.rollback_started, superseded_by=self.superseded_by,
                       superseded_at=self.superseded_at,
                       seen_actions=tuple(self.seen_actions[-ACTION_MEMORY:]),
                       index=self.index if isinstance(self.index, FleetIndex) else None,
                       changed=frozenset(self.changed))

    @property
    def plan(self) -> RolloutPlan:
        return self.s.plan

    def get(self, device: str) -> DeviceStatus | None:
        status = self.changed.get(device)
        return status if status is not None else self.base.get(device)

    def dev(self, device: str) -> DeviceStatus:
        status = self.changed.get(device)
        return status if status is not None else self.base[device]

    def device_count(self) -> int:
        return len(self.base) + sum(1 for d in self.changed if d not in self.base)

    def audit(self, actor: str, action: str, reason: str, **detail: Any) -> None:
        self.effects.append(Audit(actor=actor, action=action, reason=reason, detail=detail, at=self.now))

    def set_phase(self, new: Phase, reason: str, actor: str, action: str, **detail: Any) -> None:
        old, self.phase = self.phase, new
        log.info("rollout %s: %s -> %s (%s)", self.s.rollout_id, old, new, reason)
        self.effects.append(PhaseChanged(old=old, new=new, reason=reason))
        self.audit(actor, action, reason, old=old, new=new, wave=self.wave, **detail)

    def update(self, device: str, **changes: Any) -> bool:
        current = self.dev(device)
        new = evolve(current, **changes)
        if new == current:
            return False
        self.changed[device] = new
        self.index.change(device, current, new)
        return True

    def add(self, device: str, status: DeviceStatus) -> None:
        self.changed[device] = status
        self.index.change(device, None, status)


