"""The rollout state machine: ``step(state, event) -> (state, effects)``. Pure: no I/O, no clock.

Every input is an event carrying its own time (``now``, POSIX seconds); every output is an effect
the runner carries out (publish a ``desired`` message, write the audit log, ...). The state is a
frozen value that round-trips through :meth:`RolloutState.to_dict` / :meth:`RolloutState.from_dict`
so the runner can persist it after every step and resume after a restart.

Each step handles its event, then advances to a fixed point at the event's time: assign what may
be assigned, time out silent devices, start soaks, judge gates, move waves and phases. An operator
action is judged only after the rollout has been advanced to the action's time, so it sees what fell
due before it. So replaying an event changes nothing: device events are compared with what is
already recorded, operator actions are remembered by (action, actor, time) and ignored when seen
again, and a refused action is refused again by the same, already advanced, state.
The rules are documented in ``docs/rollouts.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .gates import GateResult, evaluate_failures, evaluate_telemetry, extract_metrics, merge_results
from .membership import NOT_TARGETED, DeviceInfo, assign_waves, hash_key, wave_of_new_device
from .plan import RolloutPlan, parse_plan
from .windows import in_any_window

__all__ = [
    "DEVICE_STATES",
    "OUTCOMES",
    "PHASES",
    "Abort",
    "AssignRelease",
    "Audit",
    "DeviceJoined",
    "DeviceOnline",
    "DeviceReport",
    "DeviceStatus",
    "Effect",
    "Event",
    "GateDecision",
    "GateEvaluated",
    "Pause",
    "PhaseChanged",
    "Promote",
    "ReleaseRef",
    "Resume",
    "Rollback",
    "RolloutState",
    "Start",
    "Supersede",
    "Tick",
    "WaveProgress",
    "check_action",
    "new_rollout",
    "step",
    "wave_counts",
]

log = logging.getLogger(__name__)

PHASES = ("pending", "running", "waiting_approval", "paused", "halted", "rolling_back", "rolled_back",
          "succeeded", "aborted", "superseded")
DEVICE_STATES = ("assigned", "applied", "failed", "refused", "rolled_back", "pending", "offline", "deferred",
                 "skipped")
OUTCOMES = ("applied", "failed", "refused", "rolled_back", "health_failed", "deferred")
ENGINE = "engine"
_FAILURES = frozenset({"failed", "refused", "rolled_back"})
_SETTLED = frozenset({"applied", "deferred", "skipped"}) | _FAILURES
_REPORTED = frozenset({"applied"}) | _FAILURES
_ASSIGNING = frozenset({"running", "waiting_approval", "succeeded"})
_ROLLBACK = frozenset({"rolling_back", "rolled_back"})
_ACTION_MEMORY = 64
_RATE_PERIOD = 60.0


# --- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseRef:
    """A signed release: its version and the commit it is at."""

    version: int
    commit: str


@dataclass(frozen=True)
class DeviceStatus:
    """One device in a rollout.

    ``target`` is what this rollout last assigned it: ``""`` (nothing), ``"new"`` or ``"previous"``.
    ``timed_out`` marks a device whose wave stopped waiting for it; ``metrics`` holds the latest
    values the wave's telemetry gates look at.
    """

    wave: int
    state: str = "pending"
    since: float = 0.0
    reason: str = ""
    online: bool = True
    target: str = ""
    assigned_at: float | None = None
    version: int | None = None
    timed_out: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WaveProgress:
    """The timestamps of one wave and how it ended (``passed``, ``failed``, ``promoted`` or ``""``)."""

    started: float | None = None
    all_reported: float | None = None
    soak_until: float | None = None
    finished: float | None = None
    result: str = ""


@dataclass(frozen=True)
class GateDecision:
    """One evaluation of a wave's gates, kept in the state's log."""

    wave: int
    at: float
    passed: bool
    reasons: tuple[str, ...] = ()
    tripped: tuple[str, ...] = ()


@dataclass(frozen=True)
class RolloutState:
    """Everything the engine knows about one rollout; serialisable with :meth:`to_dict`."""

    rollout_id: str
    release: ReleaseRef
    previous: ReleaseRef | None
    plan: RolloutPlan
    phase: str = "pending"
    wave: int = 0
    devices: Mapping[str, DeviceStatus] = field(default_factory=dict)
    waves: tuple[WaveProgress, ...] = ()
    gates: tuple[GateDecision, ...] = ()
    halted_reason: str = ""
    tripped: tuple[str, ...] = ()
    paused_from: str = ""
    clock: float = 0.0
    recent_assignments: tuple[float, ...] = ()
    rollback_started: float | None = None
    superseded_by: str = ""
    seen_actions: tuple[str, ...] = ()
    #: the device ids of each wave, in device-map order: derived from ``devices`` (a device's wave
    #: never changes and devices are never removed), kept by :func:`step` so that it does not scan
    #: the whole fleet for one wave; rebuilt when absent or not matching ``devices``; never stored
    wave_ids: tuple[tuple[str, ...], ...] | None = field(default=None, compare=False, repr=False)
    #: ``(wave, clock)`` of the last search for devices past their wave's timeout: within the same
    #: clock a device can only start waiting with a later deadline, so that search is not repeated
    #: for every report of one tick (derived like ``wave_ids``; never stored)
    timeouts_checked: tuple[int, float] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the state as JSON-able data (the plan as the document it was parsed from)."""
        return {
            "rollout_id": self.rollout_id,
            "release": _ref_dict(self.release), "previous": _ref_dict(self.previous),
            "plan": {"source": self.plan.source, "raw": _plain(self.plan.raw)},
            "phase": self.phase, "wave": self.wave,
            "devices": {d: {**vars(s), "metrics": dict(s.metrics)} for d, s in self.devices.items()},
            "waves": [vars(w).copy() for w in self.waves],
            "gates": [{**vars(g), "reasons": list(g.reasons), "tripped": list(g.tripped)}
                      for g in self.gates],
            "halted_reason": self.halted_reason, "tripped": list(self.tripped),
            "paused_from": self.paused_from, "clock": self.clock,
            "recent_assignments": list(self.recent_assignments),
            "rollback_started": self.rollback_started, "superseded_by": self.superseded_by,
            "seen_actions": list(self.seen_actions),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        """Rebuild a state written by :meth:`to_dict`.

        Raises:
            BundleError: the stored plan no longer parses.
            KeyError, TypeError, ValueError: the data is not a stored state.
        """
        plan = parse_plan(data["plan"]["raw"], source=data["plan"]["source"])
        return cls(
            rollout_id=str(data["rollout_id"]),
            release=_ref(data["release"]) or ReleaseRef(0, ""), previous=_ref(data["previous"]),
            plan=plan, phase=str(data["phase"]), wave=int(data["wave"]),
            devices={str(d): DeviceStatus(**{**s, "metrics": dict(s["metrics"])})
                     for d, s in data["devices"].items()},
            waves=tuple(WaveProgress(**w) for w in data["waves"]),
            gates=tuple(GateDecision(**{**g, "reasons": tuple(g["reasons"]), "tripped": tuple(g["tripped"])})
                        for g in data["gates"]),
            halted_reason=str(data["halted_reason"]), tripped=tuple(data["tripped"]),
            paused_from=str(data["paused_from"]), clock=float(data["clock"]),
            recent_assignments=tuple(float(t) for t in data["recent_assignments"]),
            rollback_started=data["rollback_started"], superseded_by=str(data["superseded_by"]),
            seen_actions=tuple(data["seen_actions"]),
        )


def _ref_dict(ref: ReleaseRef | None) -> dict[str, Any] | None:
    return None if ref is None else {"version": ref.version, "commit": ref.commit}


def _ref(data: Mapping[str, Any] | None) -> ReleaseRef | None:
    return None if data is None else ReleaseRef(int(data["version"]), str(data["commit"]))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- events and effects --------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin the first wave."""

    now: float
    actor: str = "system"
    reason: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passed: assign what the rate limit and windows now allow, judge timeouts and soaks."""

    now: float


@dataclass(frozen=True)
class DeviceReport:
    """A device reported on ``release_version`` (the release the report concerns).

    ``outcome`` is one of :data:`OUTCOMES`; ``health`` is a health report (``metrics``, ``checks``).
    """

    device: str
    now: float
    outcome: str
    release_version: int | None
    health: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DeviceOnline:
    """A device connected (``online``) or its last will said it is gone."""

    device: str
    online: bool
    now: float


@dataclass(frozen=True)
class DeviceJoined:
    """A device was registered while the rollout runs."""

    device_info: DeviceInfo
    now: float


@dataclass(frozen=True)
class Pause:
    """Operator: stop new assignments."""

    actor: str
    reason: str
    now: float


@dataclass(frozen=True)
class Resume:
    """Operator: continue a paused rollout."""

    actor: str
    reason: str
    now: float


@dataclass(frozen=True)
class Promote:
    """Operator: approve the next wave (``wave``, when given, must be the current wave)."""

    actor: str
    reason: str
    now: float
    wave: int | None = None


@dataclass(frozen=True)
class Abort:
    """Operator: stop for good; devices keep what they have."""

    actor: str
    reason: str
    now: float


@dataclass(frozen=True)
class Rollback:
    """Operator: assign the previous release to every device that took the new one."""

    actor: str
    reason: str
    now: float


@dataclass(frozen=True)
class Supersede:
    """A newer release started rollout ``new_rollout_id``; this one stops assigning."""

    new_rollout_id: str
    now: float


Event = (Start | Tick | DeviceReport | DeviceOnline | DeviceJoined | Pause | Resume | Promote | Abort
         | Rollback | Supersede)
_OPERATOR = (Start, Pause, Resume, Promote, Abort, Rollback, Supersede)


@dataclass(frozen=True)
class AssignRelease:
    """Publish the retained ``desired`` message: ``device`` must run ``version`` at ``commit``."""

    device: str
    version: int
    commit: str
    rollout_id: str


@dataclass(frozen=True)
class Audit:
    """One audit-log entry: who did what, why, when, with details."""

    actor: str
    action: str
    reason: str
    detail: Mapping[str, Any]
    at: float


@dataclass(frozen=True)
class GateEvaluated:
    """A wave's gates were judged."""

    wave: int
    passed: bool
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class PhaseChanged:
    """The rollout moved from phase ``old`` to ``new``."""

    old: str
    new: str
    reason: str


Effect = AssignRelease | Audit | GateEvaluated | PhaseChanged


# --- construction and queries --------------------------------------------------------------------


def new_rollout(rollout_id: str, plan: RolloutPlan, *, release: ReleaseRef, previous: ReleaseRef | None,
                devices: Sequence[DeviceInfo], now: float) -> RolloutState:
    """Return a ``pending`` rollout with every targeted device placed in its wave (see membership)."""
    placed = assign_waves(plan, devices, rollout_id)
    online = {d.id: d.online for d in devices}
    return RolloutState(
        rollout_id=rollout_id, release=release, previous=previous, plan=plan, clock=now,
        devices={d: DeviceStatus(wave=w, since=now, online=online[d]) for d, w in sorted(placed.items())},
        waves=tuple(WaveProgress() for _ in plan.waves),
    )


def wave_counts(state: RolloutState) -> list[dict[str, int]]:
    """Return, per wave, the number of devices in each device state (states with none left out)."""
    counts: list[dict[str, int]] = [{} for _ in state.plan.waves]
    for status in state.devices.values():
        counts[status.wave][status.state] = counts[status.wave].get(status.state, 0) + 1
    return counts


def _action_key(event: Event) -> str:
    actor = getattr(event, "actor", getattr(event, "new_rollout_id", ""))
    return f"{type(event).__name__}|{actor}|{event.now!r}"


def check_action(state: RolloutState, event: Event) -> str | None:
    """Return why the operator ``event`` would change nothing now, or None when it applies.

    The action is judged against the rollout as it stands at the event's time: what fell due
    between the state's clock and ``event.now`` (timeouts, soaks, gates) counts, exactly as in
    :func:`step`. Device events and ticks always apply (None). The API uses this to answer a
    refused action.
    """
    if not isinstance(event, _OPERATOR):
        return None
    work = _Work(state, event.now)
    _advance(work)
    return _refusal(work, event)


def _refusal(w: _Work, event: Start | Pause | Resume | Promote | Abort | Rollback | Supersede) -> str | None:
    """Why the operator ``event`` changes nothing in ``w`` (already advanced to its time), or None."""
    phase = w.phase
    if _action_key(event) in w.seen_actions:
        return "this action was applied already"
    if isinstance(event, Start):
        return None if phase == "pending" else f"the rollout is {phase}, not pending"
    if isinstance(event, Pause):
        pausable = phase in ("pending", "running", "waiting_approval")
        return None if pausable else f"cannot pause a rollout {phase}"
    if isinstance(event, Resume):
        return None if phase == "paused" else f"the rollout is {phase}, not paused"
    if isinstance(event, Promote):
        if phase not in ("waiting_approval", "halted"):
            return f"only a rollout waiting for approval or halted can be promoted, not {phase}"
        if event.wave is not None and event.wave != w.wave:
            return f"wave {event.wave} is not the current wave {w.wave}"
        return None
    if isinstance(event, Abort):
        return None if phase not in ("rolled_back", "succeeded", "aborted", "superseded") else \
            f"the rollout is {phase} already"
    if isinstance(event, Rollback):
        if w.s.previous is None:
            return "there is no previous release to roll back to"
        return None if phase not in ("pending", "rolling_back", "rolled_back", "superseded") else \
            f"cannot roll back a rollout {phase}"
    return None if phase != "superseded" else "the rollout is superseded already"


# --- the step --------------------------------------------------------------------------------------


class _Work:
    """A mutable copy of the state for the length of one step, and the effects it produced."""

    def __init__(self, s: RolloutState, now: float) -> None:
        self.s = s
        self.now = max(s.clock, now)
        self.phase = s.phase
        self.wave = s.wave
        self.devices = dict(s.devices)
        self.waves = list(s.waves)
        self.gates = list(s.gates)
        self.halted_reason = s.halted_reason
        self.tripped = s.tripped
        self.paused_from = s.paused_from
        cutoff = self.now - _RATE_PERIOD
        recent = s.recent_assignments  # ascending: appended at the step's clock, which never goes back
        self.recent = [t for t in recent if t > cutoff] if recent and recent[0] <= cutoff else list(recent)
        ids = s.wave_ids
        if ids is None or len(ids) != len(s.plan.waves) or sum(map(len, ids)) != len(s.devices):
            ids = _wave_ids(s.devices, len(s.plan.waves))
        self.wave_ids = ids
        self.timeouts_checked = s.timeouts_checked
        self.rollback_started = s.rollback_started
        self.superseded_by = s.superseded_by
        self.seen_actions = list(s.seen_actions)
        self.effects: list[Effect] = []

    def freeze(self) -> RolloutState:
        return replace(self.s, phase=self.phase, wave=self.wave, devices=self.devices,
                       waves=tuple(self.waves),
                       gates=tuple(self.gates), halted_reason=self.halted_reason, tripped=self.tripped,
                       paused_from=self.paused_from, clock=self.now, recent_assignments=tuple(self.recent),
                       rollback_started=self.rollback_started, superseded_by=self.superseded_by,
                       seen_actions=tuple(self.seen_actions[-_ACTION_MEMORY:]), wave_ids=self.wave_ids,
                       timeouts_checked=self.timeouts_checked)

    @property
    def plan(self) -> RolloutPlan:
        return self.s.plan

    def audit(self, actor: str, action: str, reason: str, **detail: Any) -> None:
        self.effects.append(Audit(actor=actor, action=action, reason=reason, detail=detail, at=self.now))

    def set_phase(self, new: str, reason: str, actor: str, action: str, **detail: Any) -> None:
        old, self.phase = self.phase, new
        log.info("rollout %s: %s -> %s (%s)", self.s.rollout_id, old, new, reason)
        self.effects.append(PhaseChanged(old=old, new=new, reason=reason))
        self.audit(actor, action, reason, old=old, new=new, wave=self.wave, **detail)

    def update(self, device: str, **changes: Any) -> bool:
        current = self.devices[device]
        new = replace(current, **changes)
        if new == current:
            return False
        self.devices[device] = new
        return True


def _wave_ids(devices: Mapping[str, DeviceStatus], waves: int) -> tuple[tuple[str, ...], ...]:
    out: list[list[str]] = [[] for _ in range(waves)]
    for device, dev in devices.items():
        out[dev.wave].append(device)
    return tuple(tuple(ids) for ids in out)


def step(state: RolloutState, event: Event) -> tuple[RolloutState, list[Effect]]:
    """Apply ``event`` to ``state``; return the new state and the effects to carry out, in order.

    An operator action first advances the rollout to the action's time and is then judged (see
    :func:`check_action`); one the phase does not accept changes nothing beyond that advance.
    """
    work = _Work(state, event.now)
    if isinstance(event, _OPERATOR):
        # An action is judged against the rollout at the action's time, so what fell due before it
        # happens first. Judging the stale state instead would refuse an action that a replay (seeing
        # the advanced state) accepts, and the replay would then change the rollout.
        _advance(work)
        refusal = _refusal(work, event)
        if refusal is not None:
            log.debug("rollout %s: %s ignored: %s", state.rollout_id, type(event).__name__, refusal)
        else:
            work.seen_actions.append(_action_key(event))
            _operator(work, event)
    elif isinstance(event, DeviceReport):
        _report(work, event)
    elif isinstance(event, DeviceOnline):
        _online(work, event)
    elif isinstance(event, DeviceJoined):
        _joined(work, event)
    _advance(work)
    return work.freeze(), work.effects


def _operator(w: _Work, e: Start | Pause | Resume | Promote | Abort | Rollback | Supersede) -> None:
    if isinstance(e, Start):
        w.set_phase("running", e.reason or "rollout started", e.actor, "start",
                    release=w.s.release.version, devices=len(w.devices))
        _start_wave(w, 0)
    elif isinstance(e, Pause):
        w.paused_from = w.phase
        w.set_phase("paused", e.reason, e.actor, "pause")
    elif isinstance(e, Resume):
        target, w.paused_from = w.paused_from or "running", ""
        w.set_phase(target, e.reason, e.actor, "resume")
    elif isinstance(e, Promote):
        overridden = w.phase == "halted"
        if overridden:
            w.halted_reason, w.tripped = "", ()
            w.waves[w.wave] = replace(w.waves[w.wave], result="promoted")
        _next_wave(w, e.actor, e.reason or "promoted by an operator", overridden_halt=overridden)
    elif isinstance(e, Abort):
        w.set_phase("aborted", e.reason, e.actor, "abort")
    elif isinstance(e, Rollback):
        _begin_rollback(w, e.reason, e.actor)
    else:
        w.superseded_by = e.new_rollout_id
        w.set_phase("superseded", f"superseded by rollout {e.new_rollout_id}", "system", "supersede",
                    superseded_by=e.new_rollout_id)


def _report(w: _Work, e: DeviceReport) -> None:
    dev = w.devices.get(e.device)
    if dev is None or e.outcome not in OUTCOMES:
        return
    changes: dict[str, Any] = {"online": True}
    release, previous = w.s.release, w.s.previous
    answers = _answers_assignment(dev, e)
    if answers and dev.target == "previous" and previous is not None \
            and e.release_version == previous.version:
        ok = e.outcome == "applied"
        state = "rolled_back" if ok else "failed"
        changes.update(state=state, version=e.release_version,
                       reason=_BACK if ok else f"rollback to release {previous.version}: {e.outcome}")
        if state != dev.state:
            changes["since"] = w.now
    elif answers and dev.target == "new" and (e.release_version == release.version
                                  or (e.outcome == "deferred" and e.release_version is None)):
        changes.update(_new_release_report(w, dev, e))
    if dev.state == "offline" and "state" not in changes:
        changes.update(state="assigned" if dev.target else "pending", since=w.now)
    if w.update(e.device, **changes) and changes.get("state") in _FAILURES and dev.state != changes["state"]:
        log.info("rollout %s: device %s %s: %s", w.s.rollout_id, e.device, changes["state"],
                 changes["reason"])


_BACK = "returned to the previous release"


def _answers_assignment(dev: DeviceStatus, e: DeviceReport) -> bool:
    """Whether ``e`` can be the device's answer to its current assignment: it is stamped after it.

    A report stamped at or before the assignment concerns something else; counting it would also
    make a replay of the report count where the first delivery did not (the assignment being made
    by the same step, after the report was handled).
    """
    return dev.assigned_at is not None and e.now > dev.assigned_at


def _new_release_report(w: _Work, dev: DeviceStatus, e: DeviceReport) -> dict[str, Any]:
    wave = w.plan.waves[dev.wave]
    changes: dict[str, Any] = {}
    if e.release_version is not None:
        changes["version"] = e.release_version
    if e.health and wave.gates and dev.wave == w.wave:
        metrics = extract_metrics(e.health, wave.gates)
        if metrics:
            changes["metrics"] = {**dev.metrics, **metrics}
    real_failure = dev.state in _FAILURES and not dev.timed_out
    if real_failure:
        return changes
    if e.outcome == "deferred":
        if dev.state != "applied":
            changes.update(state="deferred", reason="update lock held on the device")
    elif e.outcome == "applied":
        changes.update(state="applied", reason="", timed_out=False)
    else:
        reason = "health check failed" if e.outcome == "health_failed" else e.outcome
        changes.update(state="rolled_back" if e.outcome == "rolled_back" else
                       "refused" if e.outcome == "refused" else "failed", reason=reason, timed_out=False)
    if changes.get("state", dev.state) != dev.state:
        changes["since"] = w.now
    return changes


def _online(w: _Work, e: DeviceOnline) -> None:
    dev = w.devices.get(e.device)
    if dev is None or dev.online == e.online:
        return
    changes: dict[str, Any] = {"online": e.online}
    if not e.online and dev.state == "assigned":
        changes.update(state="offline", since=w.now)
    elif e.online and dev.state == "offline":
        changes.update(state="assigned" if dev.target else "pending", since=w.now)
    w.update(e.device, **changes)


def _joined(w: _Work, e: DeviceJoined) -> None:
    info = e.device_info
    if info.id in w.devices:
        return
    placed = {d: s.wave for d, s in w.devices.items()}
    wave = wave_of_new_device(w.plan, info, w.s.rollout_id, placed)
    if wave == NOT_TARGETED:
        return
    w.devices[info.id] = DeviceStatus(wave=wave, since=w.now, online=info.online)
    w.wave_ids = (*w.wave_ids[:wave], (*w.wave_ids[wave], info.id), *w.wave_ids[wave + 1:])
    w.audit(ENGINE, "device_joined", f"device {info.id} joined wave {wave}", device=info.id, wave=wave)


# --- advancing -------------------------------------------------------------------------------------


def _advance(w: _Work) -> None:
    for _ in range(4 * len(w.plan.waves) + 8):
        changed = _dispatch(w)
        if w.phase == "running":
            changed = _time_out(w) | changed
            changed = _mark_reported(w) | changed
        if w.phase in ("running", "waiting_approval"):
            changed = _fail_fast(w) | changed
        if w.phase == "running":
            changed = _end_soak(w) | changed
        if w.phase == "rolling_back":
            changed = _finish_rollback(w) | changed
        if not changed:
            return


def _to_dispatch(w: _Work) -> list[tuple[str, DeviceStatus, str]]:
    """The devices whose target is not what the phase wants: ``(device, status, wanted)``.

    Assigning, the devices of the waves started so far want the new release; rolling back, every
    device that took the new one (or is being returned) wants the previous one.
    """
    devices = w.devices
    if w.phase in _ASSIGNING:
        return [(d, dev, "new") for ids in w.wave_ids[:w.wave + 1] for d in ids
                if (dev := devices[d]).target != "new"]
    if w.phase in _ROLLBACK:
        return [(d, dev, "previous") for d, dev in devices.items() if dev.target == "new"]
    return []


def _dispatch(w: _Work) -> bool:
    if w.phase not in _ASSIGNING and w.phase not in _ROLLBACK:
        return False
    changed = False
    candidates: list[tuple[int, str, str]] = []
    for device, dev, wanted in _to_dispatch(w):
        if dev.online:
            candidates.append((dev.wave, device, wanted))
        elif dev.state == "pending":
            changed = w.update(device, state="offline", since=w.now) or changed
    if not candidates:
        return changed
    rollback = w.phase in _ROLLBACK
    if not rollback and not in_any_window(w.plan.maintenance_windows, w.now):
        return changed
    limit = w.plan.rate_limit_per_minute
    budget = len(candidates) if limit is None else max(0, limit - len(w.recent))
    candidates.sort(key=lambda c: (c[0], hash_key(c[1], w.s.rollout_id)))
    ref = w.s.previous if rollback else w.s.release
    assert ref is not None
    for _, device, wanted in candidates[:budget]:
        w.update(device, target=wanted, state="assigned", since=w.now, assigned_at=w.now, reason="",
                 timed_out=False)
        w.recent.append(w.now)
        w.effects.append(AssignRelease(device=device, version=ref.version, commit=ref.commit,
                                       rollout_id=w.s.rollout_id))
    return budget > 0 or changed


def _members(w: _Work, wave: int) -> list[tuple[str, DeviceStatus]]:
    devices = w.devices
    return [(d, devices[d]) for d in w.wave_ids[wave]]


def _time_out(w: _Work) -> bool:
    wave = w.plan.waves[w.wave]
    mark = (w.wave, w.now)
    if wave.timeout > 0 and w.timeouts_checked == mark:
        return False
    w.timeouts_checked = mark
    changed = False
    for device, dev in _members(w, w.wave):
        if dev.timed_out or dev.state not in ("assigned", "offline"):
            continue
        start = dev.assigned_at if dev.target == "new" and dev.assigned_at is not None else dev.since
        if w.now < start + wave.timeout:
            continue
        reason = f"no report within {wave.timeout}s"
        if wave.offline == "failed":
            w.update(device, state="failed", reason=reason, since=w.now, timed_out=True)
        elif wave.offline == "skipped":
            w.update(device, state="skipped", reason=reason, since=w.now, timed_out=True)
        else:
            w.update(device, reason=reason, timed_out=True)
        changed = True
    return changed


def _mark_reported(w: _Work) -> bool:
    progress = w.waves[w.wave]
    if progress.all_reported is not None:
        return False
    members = _members(w, w.wave)
    if any(not (s.state in _SETTLED or s.timed_out) for _, s in members):
        return False
    soak = w.plan.waves[w.wave].soak if members else 0
    w.waves[w.wave] = replace(progress, all_reported=w.now, soak_until=w.now + soak)
    w.audit(ENGINE, "wave_reported", f"every device of wave {w.wave} reported or timed out; soaking {soak}s",
            wave=w.wave, devices=len(members))
    return True


def _failure_result(w: _Work) -> GateResult:
    members = _members(w, w.wave)
    failed = [d for d, s in members if s.state in _FAILURES]
    reported = sum(1 for _, s in members if s.state in _REPORTED)
    return evaluate_failures(w.plan.waves[w.wave], reported=reported, failed=failed)


def _fail_fast(w: _Work) -> bool:
    result = _failure_result(w)
    if result.passed:
        return False
    _decide(w, result)
    return True


def _end_soak(w: _Work) -> bool:
    progress = w.waves[w.wave]
    if progress.soak_until is None or w.now < progress.soak_until or progress.result:
        return False
    wave = w.plan.waves[w.wave]
    samples = {d: s.metrics for d, s in _members(w, w.wave) if s.metrics}
    _decide(w, merge_results(_failure_result(w), evaluate_telemetry(wave.gates, samples)))
    return True


def _decide(w: _Work, result: GateResult) -> None:
    k = w.wave
    wave = w.plan.waves[k]
    w.gates.append(GateDecision(wave=k, at=w.now, passed=result.passed, reasons=result.reasons,
                                tripped=result.tripped))
    w.effects.append(GateEvaluated(wave=k, passed=result.passed,
                                   detail={**(result.detail or {}), "reasons": list(result.reasons),
                                           "tripped": list(result.tripped)}))
    if result.passed:
        w.waves[k] = replace(w.waves[k], result="passed")
        if wave.promotion == "manual":
            w.set_phase("waiting_approval", f"wave {k + 1} ({wave.name}) passed; waiting for approval",
                        ENGINE, "wait_approval")
        else:
            _next_wave(w, ENGINE)
        return
    reason = f"wave {k + 1} ({wave.name}) failed: " + "; ".join(result.reasons)
    w.waves[k] = replace(w.waves[k], result="failed", finished=w.now)
    w.halted_reason, w.tripped = reason, result.tripped
    if wave.on_failure == "rollback" and w.s.previous is not None:
        _begin_rollback(w, reason, ENGINE, tripped=list(result.tripped))
    else:
        suffix = "" if wave.on_failure == "halt" else "; no previous release to roll back to"
        w.halted_reason = reason + suffix
        w.set_phase("halted", reason + suffix, ENGINE, "halt", tripped=list(result.tripped))


def _start_wave(w: _Work, k: int) -> None:
    w.wave = k
    w.waves[k] = replace(w.waves[k], started=w.now)
    members = _members(w, k)
    w.audit(ENGINE, "wave_started", f"wave {k + 1} ({w.plan.waves[k].name}) started", wave=k,
            devices=len(members))


def _next_wave(w: _Work, actor: str, reason: str = "", **detail: Any) -> None:
    k = w.wave
    w.waves[k] = replace(w.waves[k], finished=w.waves[k].finished or w.now)
    if k + 1 >= len(w.plan.waves):
        w.set_phase("succeeded", reason or "every wave passed", actor, "succeed", **detail)
        return
    if w.phase != "running":
        w.set_phase("running", reason or f"wave {k + 2} starts", actor, "promote", **detail)
    elif reason:
        w.audit(actor, "promote", reason, wave=k, **detail)
    _start_wave(w, k + 1)


def _begin_rollback(w: _Work, reason: str, actor: str, **detail: Any) -> None:
    w.rollback_started = w.now
    previous = w.s.previous
    assert previous is not None
    w.set_phase("rolling_back", reason, actor, "rollback", to_version=previous.version, **detail)


def _rollback_timeout(w: _Work) -> int:
    return max(wave.timeout for wave in w.plan.waves[: w.wave + 1])


def _finish_rollback(w: _Work) -> bool:
    involved = [(d, s) for d, s in w.devices.items() if s.target in ("new", "previous")]
    waiting = sorted(d for d, s in involved
                     if s.target == "new" or s.state in ("assigned", "offline", "pending"))
    started = w.rollback_started if w.rollback_started is not None else w.now
    if waiting and w.now < started + _rollback_timeout(w):
        return False
    w.set_phase("rolled_back", "every device that took the release was sent back" if not waiting else
                "rollback timeout: some devices have not confirmed yet", ENGINE, "rolled_back",
                unconfirmed=waiting, devices=len(involved))
    return True
