"""A rollout's preflight on the leader: ask every targeted device to plan the release, gather the
answers, and start the first wave or stop the rollout (docs/rollouts.md).

A rollout with a preflight (``fleetctl rollout start --preflight``, or ``preflight:`` in its plan)
starts with its first wave waiting for approval (:func:`.plan.with_preflight`). :class:`PreflightDuty`,
run by the leader, then for each such rollout:

* publishes the retained ``preflight`` request to every targeted device that is online (again to
  one that comes online later, and to all of them after a change of leader: each request carries
  its own time, so a device answers a new one even for the same rollout);
* reads the answers from the stored events (a device's ``plan`` report is stored as a
  ``preflight`` event) and keeps each device's latest one;
* every time the counts change, writes the summary to the rollout's audit log (action
  ``rollout.preflight``, detail: counts, refusals grouped by reason, devices offline or not yet
  answered), which ``GET /api/v1/rollouts/{id}/preflight`` reads;
* once every online targeted device answered, or the plan's ``preflight.timeout`` passed: when at
  most ``max_refused`` of the devices that answered would refuse, the preflight passes and the first
  wave is approved (by the actor ``preflight``; with ``approve_after`` an operator still approves
  it); otherwise the rollout is aborted with the refusals as its reason, before any device changed.
  Either verdict is also the ``rollout.preflight`` notification (the rollout id and the summary).

Devices offline (or paused, which the engine treats alike) never block a preflight; they are
checked when they come back, while the preflight still runs. Not thread-safe: one thread ticks it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet_server.errors import BrokerError, StoreError, UsageError
from fleet_server.ticker import Ticker

from .model import RolloutState

__all__ = ["ACTOR", "AUDIT_ACTION", "PreflightDuty", "summary_of"]

log = logging.getLogger(__name__)

ACTOR = "preflight"
"""The actor of the audit rows and of the approval a preflight writes."""
AUDIT_ACTION = "rollout.preflight"
"""The audit action of a preflight's summary."""
EVENT_TYPE = "preflight"
_READ_CHUNK = 5000
_SHOWN = 20

PublishPreflight = Callable[[str, str, int, str], None]
"""``publish(device, revision, release, rollout_id)``: publish one device's preflight request."""


class Notify(Protocol):
    """The notifier's ``notify``."""

    def __call__(self, event: str, data: Mapping[str, Any], *, key: str | None = None,
                 at: float | None = None) -> int:
        """Enqueue one notification; return how many deliveries were added."""
        ...


class PreflightRunner(Protocol):
    """What the duty needs of the rollout runner."""

    def live_states(self) -> list[RolloutState]:
        """The rollouts the runner holds."""
        ...

    def act(self, rollout_id: str, action: str, *, actor: str, reason: str,
            wave: int | None = None) -> str | None:
        """Apply an operator action; return why it was refused, or None."""
        ...


class PreflightStore(Protocol):
    """What the duty needs of the store."""

    def history_heads(self) -> dict[str, int]:
        """The highest event and health row ids."""
        ...

    def events_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Events above a row id, oldest first."""
        ...

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Append one audit row."""
        ...


@dataclass
class _Track:
    started: float
    asked: set[str] = field(default_factory=set)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    last: dict[str, Any] | None = None
    notified: str | None = None


def summary_of(state: RolloutState, answers: Mapping[str, Mapping[str, Any]], *,
               verdict: str = "running") -> dict[str, Any]:
    """The preflight's summary: counts by outcome, refusals grouped by reason (with up to 20 devices
    each), and the devices offline or not yet answered (up to 20 each, with their counts)."""
    counts = {"change": 0, "nochange": 0, "refused": 0, "waiting": 0, "offline": 0}
    refusals: dict[str, list[str]] = {}
    offline: list[str] = []
    waiting: list[str] = []
    for device in sorted(state.devices):
        answer = answers.get(device)
        if answer is not None:
            outcome = str(answer.get("outcome"))
            counts[outcome if outcome in counts else "refused"] += 1
            if outcome == "refused":
                refusals.setdefault(str(answer.get("reason") or "no reason given"), []).append(device)
        elif state.devices[device].online:
            counts["waiting"] += 1
            waiting.append(device)
        else:
            counts["offline"] += 1
            offline.append(device)
    grouped = [{"reason": r, "devices": len(d), "examples": d[:_SHOWN]}
               for r, d in sorted(refusals.items(), key=lambda kv: -len(kv[1]))]
    return {"state": verdict, "release": state.release.version, "counts": counts, "refusals": grouped,
            "offline": offline[:_SHOWN], "waiting": waiting[:_SHOWN]}


class PreflightDuty:
    """Runs the preflights of the rollouts the runner holds (see the module docstring).

    Args:
        store: where the answers are read and the summaries audited.
        runner: the rollout runner (its views, and the approval or abort).
        publish: publishes one device's ``preflight`` request.
        clock: returns POSIX time.
        interval: seconds between two ticks of :meth:`start`'s thread.
        notify: enqueues the ``rollout.preflight`` notification of each verdict (the notifier's
            ``notify``), or None.
    """

    def __init__(self, store: PreflightStore, runner: PreflightRunner, publish: PublishPreflight, *,
                 clock: Callable[[], float] = time.time, interval: float = 1.0,
                 notify: Notify | None = None) -> None:
        self._store = store
        self._notify = notify
        self._runner = runner
        self._publish = publish
        self._clock = clock
        self._ticker = Ticker("preflight", self.tick, interval, expected=(StoreError, UsageError), log=log)
        self._tracks: dict[str, _Track] = {}
        self._cursor: int | None = None

    def start(self) -> None:
        """Tick every ``interval`` seconds in a thread until :meth:`stop`."""
        self._tracks.clear()
        self._cursor = None
        self._ticker.start()

    def stop(self) -> None:
        """Stop the thread (bounded wait). Idempotent."""
        self._ticker.stop()

    def tick(self) -> None:
        """Ask, gather and decide once for every rollout waiting on its preflight.

        Raises:
            StoreError: the database cannot be read or written.
        """
        waiting = {s.rollout_id: s for s in self._runner.live_states() if _in_preflight(s)}
        for rid in [r for r in self._tracks if r not in waiting]:
            del self._tracks[rid]
        if not waiting:
            self._cursor = None
            return
        if self._cursor is None:
            self._cursor = int(self._store.history_heads().get("events", 0))
        now = self._clock()
        for rid, state in waiting.items():
            track = self._tracks.setdefault(rid, _Track(started=now))
            self._ask(state, track)
        self._read_answers()
        for rid, state in waiting.items():
            self._decide(state, self._tracks[rid], now)

    def _ask(self, state: RolloutState, track: _Track) -> None:
        for device, status in state.devices.items():
            if device in track.asked or not status.online:
                continue
            try:
                self._publish(device, state.release.commit, state.release.version, state.rollout_id)
            except BrokerError as exc:
                log.warning("preflight request to %s not sent (retried): %s", device, exc)
                continue
            track.asked.add(device)

    def _read_answers(self) -> None:
        assert self._cursor is not None
        while True:
            rows = self._store.events_after(self._cursor, _READ_CHUNK)
            for row in rows:
                detail = row.get("detail")
                if row.get("type") != EVENT_TYPE or not isinstance(detail, Mapping):
                    continue
                track = self._tracks.get(str(detail.get("rollout_id")))
                if track is not None:
                    track.answers[str(row["device"])] = {**detail, "reason": row.get("reason")}
            if rows:
                self._cursor = int(rows[-1]["id"])
            if len(rows) < _READ_CHUNK:
                return

    def _decide(self, state: RolloutState, track: _Track, now: float) -> None:
        rule = state.plan.preflight
        assert rule is not None
        answers = {d: a for d, a in track.answers.items() if d in state.devices}
        summary = summary_of(state, answers)
        counts = summary["counts"]
        done = counts["waiting"] == 0 or now - track.started >= rule.timeout
        answered = counts["change"] + counts["nochange"] + counts["refused"]
        if done:
            passed = counts["refused"] <= rule.max_refused * answered
            summary["state"] = "passed" if passed else "failed"
        if summary != track.last:
            track.last = summary
            self._store.add_audit(ACTOR, AUDIT_ACTION, f"rollout/{state.rollout_id}", _text(summary), summary)
        if not done:
            return
        if self._notify is not None and track.notified is None:
            track.notified = summary["state"]
            self._notify(AUDIT_ACTION, {"rollout": state.rollout_id, **summary},
                         key=f"{AUDIT_ACTION}:{state.rollout_id}")
        if summary["state"] == "failed":
            top = summary["refusals"][0]["reason"] if summary["refusals"] else ""
            reason = f"preflight: {counts['refused']} of {answered} device(s) would refuse: {top}"[:900]
            refused = self._runner.act(state.rollout_id, "abort", actor=ACTOR, reason=reason)
        elif rule.approve_after:
            return  # an operator approves the first wave; the summary stays the last word
        else:
            refused = self._runner.act(state.rollout_id, "promote", actor=ACTOR, reason=_text(summary),
                                       wave=0)
        if refused is not None:
            log.warning("preflight of %s: the rollout refused the verdict: %s", state.rollout_id, refused)


def _in_preflight(state: RolloutState) -> bool:
    """A rollout whose plan has a preflight and whose first wave still waits for its approval."""
    return (state.plan.preflight is not None and state.phase == "waiting_approval" and state.wave == 0
            and bool(state.waves) and state.waves[0].started is None and not state.superseded_by)


def _text(summary: Mapping[str, Any]) -> str:
    c = summary["counts"]
    return (f"preflight {summary['state']}: {c['change']} would change, {c['nochange']} nothing, "
            f"{c['refused']} would refuse, {c['waiting']} not answered, {c['offline']} offline")
