"""The rollout engine's values: its state, the events it takes and the effects it returns.

Every value is frozen. :class:`RolloutState` round-trips through :meth:`RolloutState.to_dict` /
:meth:`RolloutState.from_dict` so the runner can persist it and resume after a restart; its device
map is a :class:`~.devicemap.DeviceMap`, which a step updates without copying the fleet. The
transitions live in :mod:`.engine`; the rules are documented in ``docs/rollouts.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .devicemap import DeviceMap
from .membership import DeviceInfo
from .plan import RolloutPlan, parse_plan

__all__ = [
    "ASSIGNING", "DEVICE_STATES", "ENGINE", "FAILURES", "OPERATOR", "OUTCOMES", "OUTCOME_PHASES", "PHASES",
    "REPORTED", "ROLLBACK", "SETTLED", "Abort", "AssignRelease", "Audit", "DeviceJoined", "DeviceOnline",
    "DeviceReport",
    "DeviceState", "DeviceStatus", "Effect", "Event", "GateDecision", "GateEvaluated", "OperatorEvent",
    "Pause", "Phase", "PhaseChanged", "Promote", "ReleaseRef", "Resume", "Rollback", "RolloutState", "Start",
    "Supersede", "Tick", "WaveProgress", "device_dict",
]

Phase = Literal["pending", "running", "waiting_approval", "paused", "halted", "rolling_back", "rolled_back",
                "succeeded", "aborted", "superseded"]
"""A rollout's phase (see ``docs/rollouts.md``)."""
DeviceState = Literal["assigned", "applied", "failed", "refused", "rolled_back", "pending", "offline",
                      "deferred", "skipped"]
"""A device's state in one rollout."""
PHASES: tuple[Phase, ...] = get_args(Phase)
DEVICE_STATES: tuple[DeviceState, ...] = get_args(DeviceState)
OUTCOMES = ("applied", "failed", "refused", "rolled_back", "health_failed", "deferred")
ENGINE = "engine"
FAILURES = frozenset({"failed", "refused", "rolled_back"})
SETTLED = frozenset({"applied", "deferred", "skipped"}) | FAILURES
REPORTED = frozenset({"applied"}) | FAILURES
ASSIGNING = frozenset({"running", "waiting_approval", "succeeded"})
ROLLBACK = frozenset({"rolling_back", "rolled_back"})
#: the phases that are a finished rollout's outcome: ``Supersede`` leaves them as they are
OUTCOME_PHASES = frozenset({"succeeded", "rolled_back", "aborted"})
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
    state: DeviceState = "pending"
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
    """The timestamps of one wave and how it ended (``passed``, ``empty`` (it had no device, so its
    gates judged nothing), ``failed``, ``promoted`` or ``""``)."""

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
    phase: Phase = "pending"
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
    superseded_at: float | None = None
    seen_actions: tuple[str, ...] = ()
    #: the derived quantities of ``devices`` (per-wave counters, pending sets; see :mod:`.index`),
    #: kept by the engine between steps; rebuilt when absent or describing another device map;
    #: never stored, never compared
    index: Any = field(default=None, compare=False, repr=False)
    #: the devices the step that returned this state changed (never stored, never compared)
    changed: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self, *, devices: bool = True) -> dict[str, Any]:
        """Return the state as JSON-able data (the plan as the document it was parsed from); with
        ``devices=False``, ``"devices"`` is None (the runner stores each device as its own row)."""
        return {
            "rollout_id": self.rollout_id,
            "release": _ref_dict(self.release), "previous": _ref_dict(self.previous),
            "plan": {"source": self.plan.source, "raw": _plain(self.plan.raw)},
            "phase": self.phase, "wave": self.wave,
            "devices": {d: device_dict(s) for d, s in self.devices.items()} if devices else None,
            "waves": [vars(w).copy() for w in self.waves],
            "gates": [{**vars(g), "reasons": list(g.reasons), "tripped": list(g.tripped)}
                      for g in self.gates],
            "halted_reason": self.halted_reason, "tripped": list(self.tripped),
            "paused_from": self.paused_from, "clock": self.clock,
            "recent_assignments": list(self.recent_assignments),
            "rollback_started": self.rollback_started, "superseded_by": self.superseded_by,
            "superseded_at": self.superseded_at, "seen_actions": list(self.seen_actions),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        """Rebuild a state written by :meth:`to_dict`.

        Raises:
            PlanError: the stored plan no longer parses.
            KeyError, TypeError, ValueError: the data is not a stored state.
        """
        plan = parse_plan(data["plan"]["raw"], source=data["plan"]["source"])
        return cls(
            rollout_id=str(data["rollout_id"]),
            release=_ref(data["release"]) or ReleaseRef(0, ""), previous=_ref(data["previous"]),
            plan=plan, phase=_phase(data["phase"]), wave=int(data["wave"]),
            devices=DeviceMap({str(d): DeviceStatus(**{**s, "metrics": dict(s["metrics"])})
                               for d, s in data["devices"].items()}),
            waves=tuple(WaveProgress(**w) for w in data["waves"]),
            gates=tuple(GateDecision(**{**g, "reasons": tuple(g["reasons"]), "tripped": tuple(g["tripped"])})
                        for g in data["gates"]),
            halted_reason=str(data["halted_reason"]), tripped=tuple(data["tripped"]),
            paused_from=str(data["paused_from"]), clock=float(data["clock"]),
            recent_assignments=tuple(float(t) for t in data["recent_assignments"]),
            rollback_started=data["rollback_started"], superseded_by=str(data["superseded_by"]),
            superseded_at=_optional_time(data.get("superseded_at")), seen_actions=tuple(data["seen_actions"]),
        )


def device_dict(status: DeviceStatus) -> dict[str, Any]:
    """Return one device's status as JSON-able data (as :meth:`RolloutState.to_dict` writes it)."""
    return {**vars(status), "metrics": dict(status.metrics)}


def _phase(value: object) -> Phase:
    if value not in PHASES:
        raise ValueError(f"unknown rollout phase {value!r}")
    return value


def _optional_time(value: Any) -> float | None:
    return None if value is None else float(value)


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
    """A newer release started rollout ``new_rollout_id``; this one stops assigning. A finished
    rollout (succeeded, rolled back, aborted) keeps its phase: being superseded is a separate fact."""

    new_rollout_id: str
    now: float


Event = (Start | Tick | DeviceReport | DeviceOnline | DeviceJoined | Pause | Resume | Promote | Abort
         | Rollback | Supersede)
OperatorEvent = Start | Pause | Resume | Promote | Abort | Rollback | Supersede
OPERATOR = (Start, Pause, Resume, Promote, Abort, Rollback, Supersede)


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

    old: Phase
    new: Phase
    reason: str


Effect = AssignRelease | Audit | GateEvaluated | PhaseChanged


