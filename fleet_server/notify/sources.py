"""What the server's parts report, turned into notifications: a rollout's phase change, a passed
wave gate, a device event from the store's history, a device offline too long. Pure: each function
takes rows or states and returns :class:`Pending` values (an event name, a deduplication key, the
``data`` of the body and the time it happened)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_server.notify.events import ROLLOUT_PHASE_EVENTS
from fleet_server.rollouts.model import RolloutState

__all__ = ["Pending", "device_event", "gate_events", "offline_event", "phase_event"]


@dataclass(frozen=True)
class Pending:
    """One event to enqueue. ``key`` is the same whenever the same fact is seen again (a rescan after
    a restart), so its event id is the same and it is stored once per receiver."""

    event: str
    key: str
    at: float
    data: Mapping[str, Any] = field(default_factory=dict)


def phase_event(state: RolloutState, old_phase: str, at: float) -> Pending | None:
    """Return the event of a committed rollout phase change, None for a change nobody subscribes to
    (a pause, a resume, the start of a rollback)."""
    event = ROLLOUT_PHASE_EVENTS.get(state.phase)
    if event is None or (state.phase == "running" and old_phase != "pending"):
        return None
    data: dict[str, Any] = {"rollout": state.rollout_id, "release": state.release.version,
                            "commit": state.release.commit, "phase": state.phase, "from": old_phase,
                            "wave": state.wave,
                            "previous": state.previous.version if state.previous is not None else None}
    if state.phase in ("halted", "rolled_back") and state.halted_reason:
        data["reason"] = state.halted_reason
    return Pending(event, f"{event}:{state.rollout_id}:{state.clock}", at, data)


def gate_events(gates: Iterable[Mapping[str, Any]]) -> list[Pending]:
    """Return ``rollout.wave_passed`` for each passed gate decision of a committed rollout write
    (``rollout_id, wave, at, passed, detail``)."""
    out: list[Pending] = []
    for g in gates:
        if not g.get("passed"):
            continue
        rid, wave, at = str(g["rollout_id"]), int(g["wave"]), float(g.get("at") or 0.0)
        out.append(Pending("rollout.wave_passed", f"rollout.wave_passed:{rid}:{wave}:{at}", at,
                           {"rollout": rid, "wave": wave}))
    return out


def device_event(row: Mapping[str, Any]) -> Pending | None:
    """Return the event of one stored device event row: ``device.release_refused`` for a
    ``sync_refused``, ``device.drift_uncorrected`` for a ``drift_detected`` the device did not
    correct (``detail.corrected`` false: audit mode, or the device is paused); None otherwise."""
    kind = row.get("type")
    stored = row.get("detail")
    # the store keeps the message's fields beyond the envelope: the device's ``detail`` is one of them
    inner = stored.get("detail") if isinstance(stored, Mapping) else None
    detail: Mapping[str, Any] = inner if isinstance(inner, Mapping) else {}
    base: dict[str, Any] = {"device": row.get("device"), "ts": row.get("ts"), "release": row.get("release"),
                            "commit": row.get("commit")}
    if kind == "sync_refused":
        event = "device.release_refused"
        data = {**base, "reason": row.get("reason")}
    elif kind == "drift_detected" and detail.get("corrected") is False:
        event = "device.drift_uncorrected"
        data = {**base, "count": detail.get("count"), "resources": detail.get("resources"),
                "mode": detail.get("mode")}
    else:
        return None
    return Pending(event, f"{event}:event:{row['id']}", float(row.get("received_at") or row.get("ts") or 0.0),
                   data)


def offline_event(row: Mapping[str, Any], now: float) -> Pending:
    """Return ``device.offline`` for a device row (``id, online_ts, last_seen``) offline since
    ``online_ts``; one per offline period."""
    since = float(row["online_ts"])
    return Pending("device.offline", f"device.offline:{row['id']}:{since}", now,
                   {"device": row["id"], "offline_since": since, "last_seen": row.get("last_seen"),
                    "offline_seconds": round(now - since, 1)})
