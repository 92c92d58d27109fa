"""The names of the events a receiver may subscribe to (``docs/notifications.md`` lists each with its
``data``)."""

from __future__ import annotations

__all__ = ["EVENTS", "ROLLOUT_PHASE_EVENTS"]

ROLLOUT_PHASE_EVENTS = {
    "running": "rollout.started",
    "waiting_approval": "rollout.waiting_approval",
    "halted": "rollout.halted",
    "rolled_back": "rollout.rolled_back",
    "succeeded": "rollout.succeeded",
}
"""The rollout phase a change leads to -> the event it is (``running`` only when coming from
``pending``: a resumed rollout is not started again)."""

EVENTS = (
    "rollout.started",
    "rollout.wave_passed",
    "rollout.waiting_approval",
    "rollout.halted",
    "rollout.rolled_back",
    "rollout.succeeded",
    "release.refused",
    "device.release_refused",
    "device.drift_uncorrected",
    "device.offline",
    "rollout.preflight",
)
"""Every event name a receiver may list (``*`` subscribes to all of them)."""
