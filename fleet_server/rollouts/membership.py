"""Deterministic wave membership: which devices a rollout targets and which wave each one is in.

The order of devices is ``sha256(rollout_id + "\\0" + device_id)``, so the same rollout picks the
same canaries after a restart or a rerun, on any Python version. Rules (see docs/rollouts.md):

1. Only devices matching the plan's ``target`` take part (every device when there is none).
2. With ``canary_first``, devices labelled ``<canary_label>: "true"`` fill the first wave.
3. Waves are then filled in order: a ``selector`` wave takes every matching device not yet placed;
   a ``count`` wave takes devices in hash order until it holds ``count`` (canaries included);
   a ``percent`` wave takes devices in hash order until ``ceil(percent% of the targeted fleet)``
   devices are placed in it and the waves before it (cumulative).
4. The last wave takes every device still unplaced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from edge_core.bundle import DeviceIdentity

from .plan import RolloutPlan

__all__ = ["NOT_TARGETED", "DeviceInfo", "assign_waves", "hash_key", "is_targeted", "order_devices",
           "wave_of_new_device", "wave_of_new_device_ordered"]

NOT_TARGETED = -1
"""What :func:`wave_of_new_device` returns for a device the plan's ``target`` does not select."""


@dataclass(frozen=True)
class DeviceInfo:
    """What membership needs to know about a device."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: str = ""
    online: bool = True

    def identity(self) -> DeviceIdentity:
        """Return the device as a bundle :class:`DeviceIdentity`, for selector matching."""
        return DeviceIdentity(id=self.id, labels=self.labels, profile=self.profile)


def hash_key(device_id: str, rollout_id: str) -> str:
    """Return the hex sha256 of ``rollout_id + "\\0" + device_id``: the device's place in the order."""
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).hexdigest()


def order_devices(device_ids: Iterable[str], rollout_id: str) -> list[str]:
    """Return the distinct ``device_ids`` sorted by :func:`hash_key` (ties, never seen, by id)."""
    return sorted(set(device_ids), key=lambda d: (hash_key(d, rollout_id), d))


def is_targeted(plan: RolloutPlan, device: DeviceInfo) -> bool:
    """Tell whether the plan's ``target`` selects ``device`` (no target: every device)."""
    return plan.target is None or plan.target.matches(device.identity())


def _is_canary(plan: RolloutPlan, device: DeviceInfo) -> bool:
    return plan.canary_first and str(device.labels.get(plan.canary_label, "")).lower() == "true"


def assign_waves(plan: RolloutPlan, devices: Sequence[DeviceInfo], rollout_id: str) -> dict[str, int]:
    """Place every targeted device in a wave (device id -> wave index) by the module's rules.

    The result is the same for the same plan, devices (in any order) and rollout id.
    """
    by_id = {d.id: d for d in devices if is_targeted(plan, d)}
    order = order_devices(by_id, rollout_id)
    total = len(order)
    placed: dict[str, int] = {}
    last = len(plan.waves) - 1
    for device_id in order:
        if _is_canary(plan, by_id[device_id]):
            placed[device_id] = 0
    for index, wave in enumerate(plan.waves):
        if index == last:
            for device_id in order:
                placed.setdefault(device_id, index)
            break
        if wave.selector is not None:
            for device_id in order:
                if device_id not in placed and wave.selector.matches(by_id[device_id].identity()):
                    placed[device_id] = index
            continue
        if wave.count is not None:
            want = wave.count - sum(1 for w in placed.values() if w == index)
        elif wave.percent is not None:
            upto = math.ceil(wave.percent * total / 100 - 1e-9)
            want = upto - sum(1 for w in placed.values() if w <= index)
        else:
            want = 0
        for device_id in order:
            if want <= 0:
                break
            if device_id not in placed:
                placed[device_id] = index
                want -= 1
    return placed


def _hash_placed_waves(plan: RolloutPlan) -> set[int]:
    last = len(plan.waves) - 1
    return {i for i, w in enumerate(plan.waves) if i == last or w.percent is not None or w.count is not None}


def wave_of_new_device(plan: RolloutPlan, device: DeviceInfo, rollout_id: str,
                       current_assignment: Mapping[str, int]) -> int:
    """Return the wave of a device that joined during the rollout, without moving any member.

    Rule: an untargeted device gets :data:`NOT_TARGETED`; a device already placed keeps its wave;
    a canary (with ``canary_first``) joins the first wave; else the first ``selector`` wave before
    the last that matches it; else the wave of the member that precedes it in hash order among the
    members of ``percent``/``count`` waves and the last wave (the first such wave when none
    precedes it) — so the shares of the fleet stay close to the plan's.
    """
    if device.id in current_assignment:
        return current_assignment[device.id]
    hashed = _hash_placed_waves(plan)
    keyed = sorted((hash_key(member, rollout_id), w) for member, w in current_assignment.items()
                   if w in hashed)

    def predecessor(key: str) -> int | None:
        before = [w for k, w in keyed if k < key]
        return before[-1] if before else None

    wave = wave_of_new_device_ordered(plan, device, rollout_id, predecessor)
    return NOT_TARGETED if wave is None else wave


def wave_of_new_device_ordered(plan: RolloutPlan, device: DeviceInfo, rollout_id: str,
                               predecessor: Callable[[str], int | None]) -> int | None:
    """Return the wave of a device not yet placed that joins during the rollout (None: untargeted),
    by the rule of :func:`wave_of_new_device`. ``predecessor(key)`` returns the wave of the member
    of a ``percent``/``count`` wave or the last wave with the greatest hash key below ``key``, or
    None when there is none (the caller keeps those members in hash order)."""
    if not is_targeted(plan, device):
        return None
    if _is_canary(plan, device):
        return 0
    last = len(plan.waves) - 1
    for index, wave in enumerate(plan.waves[:last]):
        if wave.selector is not None and wave.selector.matches(device.identity()):
            return index
    before = predecessor(hash_key(device.id, rollout_id))
    return before if before is not None else min(_hash_placed_waves(plan))
