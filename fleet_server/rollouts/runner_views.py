"""The rollout runner's reads, served without waiting for a tick.

After every tick (and every start or operator action) the runner publishes one immutable
:class:`RolloutView` per rollout it holds: the state (whose device map is never changed in place,
see :mod:`.devicemap`) with its per-wave counts, replaced as a whole dict. The reads here use the
latest published views, or the store for rollouts the runner does not hold, and never take the
runner's lock, so API reads and metrics do not queue behind a tick.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fleet_server.store import FleetStore

from .engine import wave_counts
from .model import RolloutState, device_dict
from .runner_io import PROGRESS_KEYS, progress_counts

__all__ = ["RolloutView", "RunnerReads", "state_from_row"]


@dataclass(frozen=True)
class RolloutView:
    """One held rollout as the runner last left it."""

    state: RolloutState
    counts: tuple[dict[str, int], ...]
    actor: str
    reason: str
    created: float
    updated: float


def state_from_row(row: Mapping[str, Any]) -> RolloutState:
    """Return the state of a stored rollout row (as the store's ``rollouts`` view reads it).

    Raises:
        PlanError: the stored plan no longer parses.
        KeyError, TypeError, ValueError: the row holds no valid state.
    """
    data = row["state"]
    if not isinstance(data, Mapping):
        raise TypeError("the stored rollout state is not a mapping")
    return RolloutState.from_dict(data)


def _device_entry(device: str, status: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": device, "wave": status["wave"], "state": status["state"], "reason": status["reason"],
            "online": status["online"], "target": status["target"], "version": status["version"]}


class RunnerReads:
    """The read side of :class:`~.runner.RolloutRunner` (see the module docstring)."""

    _store: FleetStore
    _views: Mapping[str, RolloutView]

    def state(self, rollout_id: str) -> RolloutState | None:
        """Return the current state of a rollout (as the last tick left it when held, else from the
        store).

        Raises:
            StoreError: the database cannot be read.
        """
        view = self._views.get(rollout_id)
        if view is not None:
            return view.state
        row = self._store.rollout_row(rollout_id)
        return None if row is None else state_from_row(row)

    def summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return rollouts newest first without their device maps (for listings), each with
        ``superseded_by`` / ``superseded_at`` (None unless a newer rollout superseded it).

        Raises:
            StoreError: the database cannot be read.
        """
        rows = self._store.rollout_summaries(limit)
        superseded = self._store.rollout_supersessions([str(r["id"]) for r in rows])
        for row in rows:
            row["superseded_by"], row["superseded_at"] = superseded.get(str(row["id"]), (None, None))
            samples = self._store.latest_rollout_samples(row["id"])
            row["wave_count"] = len(samples)
            row["waves"] = [{"progress": {k: s[k] for k in PROGRESS_KEYS}} for s in samples]
        return rows

    def metrics_snapshot(self) -> list[dict[str, Any]]:
        """Return per held rollout its id, release, phase, wave, device counts per wave and gate
        decisions per wave (``{"passed": n, "failed": n}``), for the Prometheus collector."""
        out = []
        for view in sorted(self._views.values(), key=lambda v: v.created, reverse=True):
            s = view.state
            gates = [{"passed": 0, "failed": 0} for _ in s.plan.waves]
            for g in s.gates:
                gates[g.wave]["passed" if g.passed else "failed"] += 1
            out.append({"id": s.rollout_id, "release": s.release.version, "phase": s.phase, "wave": s.wave,
                        "waves": [dict(c) for c in view.counts], "gates": gates})
        return out

    def live_states(self) -> list[RolloutState]:
        """Return the states of the rollouts the runner holds (for metrics), newest first."""
        return [v.state for v in sorted(self._views.values(), key=lambda v: v.created, reverse=True)]

    def describe(self, rollout_id: str, *, devices: bool = False) -> dict[str, Any] | None:
        """Return one rollout for the API: summary, waves with counts, gate decisions, audit, progress
        samples, ``device_count`` and, only when ``devices`` is True, every device (the API pages
        them with :meth:`devices` instead); None when unknown.

        Raises:
            StoreError: the database cannot be read.
        """
        view = self._views.get(rollout_id)
        if view is not None:
            state, counts = view.state, [dict(c) for c in view.counts]
            who: dict[str, Any] = {"actor": view.actor, "reason": view.reason, "created": view.created,
                                   "updated": view.updated}
        else:
            row = self._store.rollout_row(rollout_id)
            if row is None:
                return None
            state = state_from_row(row)
            counts = wave_counts(state)
            who = {"actor": row.get("actor"), "reason": row.get("reason"), "created": row["created"],
                   "updated": row["updated"]}
        waves = []
        for k, (wave, progress) in enumerate(zip(state.plan.waves, state.waves, strict=True)):
            waves.append({"index": k, "name": wave.name, "promotion": wave.promotion,
                          "pause_before": wave.pause_before, "soak": wave.soak,
                          "started": progress.started, "soak_until": progress.soak_until,
                          "finished": progress.finished, "result": progress.result,
                          "states": counts[k], "progress": progress_counts(counts[k]),
                          "devices": sum(counts[k].values())})
        out = {"id": rollout_id, "release": state.release.version, "commit": state.release.commit,
               "previous": state.previous.version if state.previous else None, "plan": state.plan.name,
               "phase": state.phase, "wave": state.wave, "halted_reason": state.halted_reason,
               "tripped": list(state.tripped), "superseded_by": state.superseded_by or None,
               "superseded_at": state.superseded_at, **who, "waves": waves,
               "device_count": len(state.devices),
               "preflight": None if state.plan.preflight is None else asdict(state.plan.preflight),
               "gates": self._store.rollout_gates(rollout_id),
               "audit": self._store.rollout_audit(rollout_id),
               "samples": self._store.rollout_samples(rollout_id)}
        if devices:
            out["devices"] = {d: {k: v for k, v in _device_entry(d, device_dict(s)).items() if k != "id"}
                              for d, s in sorted(state.devices.items())}
        return out

    def devices(self, rollout_id: str, *, wave: int | None = None, state: str | None = None,
                offset: int = 0, limit: int = 100) -> dict[str, Any] | None:
        """Return one page of a rollout's devices, by device id, only those of ``wave`` and in
        ``state`` when given: ``{"total", "offset", "limit", "devices": [{id, wave, state,
        reason, online, target, version}]}``; None when the rollout is unknown. Served from the
        device rows the runner wrote with its last tick, without the device map.

        Raises:
            StoreError: the database cannot be read.
        """
        offset, limit = max(0, int(offset)), max(0, min(int(limit), 1000))
        total, rows = self._store.rollout_devices_page(rollout_id, wave=wave, state=state, offset=offset,
                                                       limit=limit)
        if total == 0 and not self._store.rollout_exists(rollout_id):
            return None
        return {"total": total, "offset": offset, "limit": limit,
                "devices": [_device_entry(r["device"], r) for r in rows]}
