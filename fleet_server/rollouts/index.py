"""The derived quantities of a rollout's device map, kept up to date as devices change.

The engine judges gates, timeouts and dispatch from quantities derived from every device of a wave
(how many reported, which failed, who still waits for an assignment, who is past its timeout).
Recomputing them for every report made a report cost O(fleet). :class:`FleetIndex` holds them as
counters, sets and heaps that :meth:`FleetIndex.change` updates per changed device, so that:

* a report that changes nothing costs O(1);
* a changed device costs O(log n) (heap pushes) plus O(1) set and counter updates;
* dispatch costs O(log n) per assigned device (a heap per wave in hash order), timeouts O(log n)
  per device timed out (a heap per wave by start time), gates O(1) (counters).

Heaps are lazy: an entry is checked against the current sets when it comes out, so a device that
left a set needs no heap removal. The index describes one :class:`~.devicemap.DeviceMap` (its
``owner``); the engine rebuilds it (O(fleet), once) for a state whose map it does not describe,
such as a state just loaded from the store. Pure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from typing import Protocol

from .membership import NOT_TARGETED, DeviceInfo, hash_key, wave_of_new_device_ordered
from .model import FAILURES, REPORTED, SETTLED, DeviceStatus
from .plan import RolloutPlan

__all__ = ["Derived", "FleetIndex", "timeout_start"]

_WAITING = ("assigned", "offline")
_ROLLBACK_WAITING = ("assigned", "offline", "pending")


def timeout_start(dev: DeviceStatus) -> float:
    """When the device's wave timeout starts counting: its assignment of the new release, else when
    it entered its state."""
    return dev.assigned_at if dev.target == "new" and dev.assigned_at is not None else dev.since


class Derived(Protocol):
    """What the engine asks about the devices of a rollout (see :class:`FleetIndex`)."""

    def change(self, device: str, old: DeviceStatus | None, new: DeviceStatus) -> None:
        """Account for ``device`` going from ``old`` (None: it joined) to ``new``."""

    def wave_size(self, wave: int) -> int:
        """The number of devices in ``wave``."""

    def members(self, wave: int) -> Sequence[str]:
        """The devices of ``wave`` in device-map order."""

    def counts(self, wave: int) -> dict[str, int]:
        """The number of devices of ``wave`` in each state (states with none left out)."""

    def unsettled(self, wave: int) -> int:
        """How many devices of ``wave`` neither settled nor timed out."""

    def reported(self, wave: int) -> int:
        """How many devices of ``wave`` applied or failed."""

    def failed(self, wave: int) -> list[str]:
        """The devices of ``wave`` that failed, refused or rolled back."""

    def failures(self, wave: int) -> int:
        """How many devices of ``wave`` failed, refused or rolled back."""

    def due(self, wave: int, now: float, timeout: int) -> list[str]:
        """The devices of ``wave`` waiting (assigned or offline, not timed out) since ``timeout``
        seconds or more at ``now``; each is returned once (the caller marks it timed out)."""

    def offline_pending(self, rollback: bool, upto: int) -> list[str]:
        """The offline ``pending`` devices that want an assignment (see :meth:`take`)."""

    def candidates(self, rollback: bool, upto: int) -> int:
        """How many online devices want an assignment: assigning, those of waves ``0..upto`` whose
        target is not the new release; rolling back, those whose target is the new release."""

    def take(self, rollback: bool, upto: int, n: int) -> list[str]:
        """The first ``n`` candidates in (wave, hash key) order."""

    def rollback_waiting(self) -> bool:
        """Whether some device still has the new release as target or waits for the previous one."""

    def join_wave(self, plan: RolloutPlan, info: DeviceInfo, rollout_id: str) -> int:
        """The wave a device joining now goes to (:data:`~.membership.NOT_TARGETED` when none)."""


class FleetIndex:
    """The incremental :class:`Derived` (see the module docstring)."""

    def __init__(self, rollout_id: str, waves: int) -> None:
        self.rollout_id = rollout_id
        #: the device map this index describes (None while a step updates it)
        self.owner: Mapping[str, DeviceStatus] | None = None
        self._members: list[list[str]] = [[] for _ in range(waves)]
        self._counts: list[dict[str, int]] = [{} for _ in range(waves)]
        self._unsettled = [0] * waves
        self._reported = [0] * waves
        self._failed: list[set[str]] = [set() for _ in range(waves)]
        # dispatch: [group][wave] with group 1 = target "new", 0 = any other target
        self._cand: tuple[list[set[str]], list[set[str]]] = ([set() for _ in range(waves)],
                                                             [set() for _ in range(waves)])
        self._offpend: tuple[list[set[str]], list[set[str]]] = ([set() for _ in range(waves)],
                                                                [set() for _ in range(waves)])
        self._heaps: tuple[list[list[tuple[str, str]] | None], list[list[tuple[str, str]] | None]] = (
            [None] * waves, [None] * waves)
        self._hkeys: dict[str, str] = {}
        self._target_new = 0
        self._previous_waiting = 0
        # timeouts: current start of every waiting device, and a heap per wave of (start, device)
        self._start: dict[str, float] = {}
        self._timeouts: list[list[tuple[float, str]]] = [[] for _ in range(waves)]
        # join placement: (hash key, wave) of the members of hash-placed waves, built on first join
        self._ordered: list[tuple[str, int]] | None = None
        self._hashed: set[int] = set()

    @classmethod
    def build(cls, rollout_id: str, waves: int, devices: Mapping[str, DeviceStatus]) -> FleetIndex:
        """Return the index of ``devices`` (O(fleet))."""
        index = cls(rollout_id, waves)
        for device, status in devices.items():
            index.change(device, None, status)
        index.owner = devices
        return index

    def _hkey(self, device: str) -> str:
        key = self._hkeys.get(device)
        if key is None:
            key = self._hkeys[device] = hash_key(device, self.rollout_id)
        return key

    def change(self, device: str, old: DeviceStatus | None, new: DeviceStatus) -> None:
        """Account for ``device`` going from ``old`` (None: it joined) to ``new``."""
        w = new.wave
        group = 1 if new.target == "new" else 0
        previous_start: float | None = None
        was_candidate = False
        if old is None:
            self._members[w].append(device)
            if self._ordered is not None and w in self._hashed:
                insort(self._ordered, (self._hkey(device), w))
        else:
            was_candidate = old.online and (old.target == "new") == (group == 1)
            self._leave(device, old)
            previous_start = self._start.pop(device, None)
        counts = self._counts[w]
        counts[new.state] = counts.get(new.state, 0) + 1
        if not (new.state in SETTLED or new.timed_out):
            self._unsettled[w] += 1
        if new.state in REPORTED:
            self._reported[w] += 1
        if new.state in FAILURES:
            self._failed[w].add(device)
        if new.online:
            self._cand[group][w].add(device)
            heap = self._heaps[group][w]
            if heap is not None and not was_candidate:
                heapq.heappush(heap, (self._hkey(device), device))
        elif new.state == "pending":
            self._offpend[group][w].add(device)
        if group:
            self._target_new += 1
        elif new.target == "previous" and new.state in _ROLLBACK_WAITING:
            self._previous_waiting += 1
        if new.state in _WAITING and not new.timed_out:
            start = timeout_start(new)
            self._start[device] = start
            if previous_start != start:
                heapq.heappush(self._timeouts[w], (start, device))

    def _leave(self, device: str, old: DeviceStatus) -> None:
        w = old.wave
        counts = self._counts[w]
        left = counts[old.state] - 1
        if left:
            counts[old.state] = left
        else:
            del counts[old.state]
        if not (old.state in SETTLED or old.timed_out):
            self._unsettled[w] -= 1
        if old.state in REPORTED:
            self._reported[w] -= 1
        if old.state in FAILURES:
            self._failed[w].discard(device)
        group = 1 if old.target == "new" else 0
        self._cand[group][w].discard(device)
        self._offpend[group][w].discard(device)
        if group:
            self._target_new -= 1
        elif old.target == "previous" and old.state in _ROLLBACK_WAITING:
            self._previous_waiting -= 1

    def wave_size(self, wave: int) -> int:
        """The number of devices in ``wave``."""
        return len(self._members[wave])

    def members(self, wave: int) -> Sequence[str]:
        """The devices of ``wave`` in device-map order."""
        return self._members[wave]

    def counts(self, wave: int) -> dict[str, int]:
        """The number of devices of ``wave`` in each state (states with none left out)."""
        return dict(self._counts[wave])

    def unsettled(self, wave: int) -> int:
        """How many devices of ``wave`` neither settled nor timed out."""
        return self._unsettled[wave]

    def reported(self, wave: int) -> int:
        """How many devices of ``wave`` applied or failed."""
        return self._reported[wave]

    def failed(self, wave: int) -> list[str]:
        """The devices of ``wave`` that failed, refused or rolled back."""
        return list(self._failed[wave])

    def failures(self, wave: int) -> int:
        """How many devices of ``wave`` failed, refused or rolled back."""
        return len(self._failed[wave])

    def due(self, wave: int, now: float, timeout: int) -> list[str]:
        """The waiting devices of ``wave`` past ``timeout`` at ``now`` (each returned once)."""
        heap, out = self._timeouts[wave], []
        while heap and not now < heap[0][0] + timeout:
            start, device = heapq.heappop(heap)
            if self._start.get(device) == start:
                del self._start[device]
                out.append(device)
        return out

    def _waves(self, rollback: bool, upto: int) -> range:
        return range(len(self._members)) if rollback else range(min(upto + 1, len(self._members)))

    def offline_pending(self, rollback: bool, upto: int) -> list[str]:
        """The offline ``pending`` devices that want an assignment."""
        sets = self._offpend[1 if rollback else 0]
        return [d for w in self._waves(rollback, upto) for d in sets[w]]

    def candidates(self, rollback: bool, upto: int) -> int:
        """How many online devices want an assignment."""
        sets = self._cand[1 if rollback else 0]
        return sum(len(sets[w]) for w in self._waves(rollback, upto))

    def take(self, rollback: bool, upto: int, n: int) -> list[str]:
        """The first ``n`` candidates in (wave, hash key) order, removed from the heaps."""
        group = 1 if rollback else 0
        out: list[str] = []
        for w in self._waves(rollback, upto):
            members = self._cand[group][w]
            if len(out) >= n:
                break
            if not members:
                continue
            if len(members) <= n - len(out):  # all of them: a sort of this wave's candidates
                out.extend(sorted(members, key=self._hkey))
                continue
            heap = self._heaps[group][w]
            if heap is None:
                heap = [(self._hkey(d), d) for d in members]
                heapq.heapify(heap)
                self._heaps[group][w] = heap
            chosen: set[str] = set()
            while heap and len(out) < n:
                _, device = heapq.heappop(heap)
                if device in members and device not in chosen:
                    chosen.add(device)
                    out.append(device)
        return out

    def rollback_waiting(self) -> bool:
        """Whether some device still has the new release as target or waits for the previous one."""
        return self._target_new + self._previous_waiting > 0

    def join_wave(self, plan: RolloutPlan, info: DeviceInfo, rollout_id: str) -> int:
        """The wave a device joining now goes to (NOT_TARGETED when none)."""
        if self._ordered is None:
            last = len(plan.waves) - 1
            self._hashed = {i for i, w in enumerate(plan.waves)
                            if i == last or w.percent is not None or w.count is not None}
            self._ordered = sorted((self._hkey(d), w) for w in self._hashed for d in self._members[w])
        ordered = self._ordered

        def predecessor(key: str) -> int | None:
            at = bisect_left(ordered, (key, -1))
            return ordered[at - 1][1] if at else None

        wave = wave_of_new_device_ordered(plan, info, rollout_id, predecessor)
        return NOT_TARGETED if wave is None else wave
