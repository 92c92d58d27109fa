"""The rollout state machine: ``step(state, event) -> (state, effects)``. Pure: no I/O, no clock.

Every input is an event carrying its own time (``now``, POSIX seconds); every output is an effect
the runner carries out (publish a ``desired`` message, write the audit log, ...). The values (state,
events, effects) live in :mod:`.model`; the state round-trips through :meth:`RolloutState.to_dict` /
:meth:`RolloutState.from_dict` so the runner can persist it and resume after a restart.

Each step handles its event, then advances to a fixed point at the event's time: assign what may
be assigned, time out silent devices, start soaks, judge gates, move waves and phases. An operator
action is judged only after the rollout has been advanced to the action's time, so it sees what fell
due before it. So replaying an event changes nothing: device events are compared with what is
already recorded, operator actions are remembered by (action, actor, time) and ignored when seen
again, and a refused action is refused again by the same, already advanced, state.

A step costs what it changes, not the size of the fleet: the device map is shared with the previous
state (:class:`~.devicemap.DeviceMap`) and every quantity judged over a wave (counts, failures,
who waits for an assignment or is past its timeout) is kept up to date per changed device by the
state's :class:`~.index.FleetIndex`. The rules are documented in ``docs/rollouts.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .devicemap import DeviceMap
from .gates import (
    GateResult,
    evaluate_failures,
    evaluate_telemetry,
    extract_metrics,
    failure_gates_pass,
    merge_results,
)
from .index import FleetIndex
from .membership import NOT_TARGETED, DeviceInfo, assign_waves
from .model import (
    ASSIGNING,
    DEVICE_STATES,
    ENGINE,
    FAILURES,
    OPERATOR,
    OUTCOME_PHASES,
    OUTCOMES,
    PHASES,
    ROLLBACK,
    Abort,
    AssignRelease,
    Audit,
    DeviceJoined,
    DeviceOnline,
    DeviceReport,
    DeviceStatus,
    Effect,
    Event,
    GateDecision,
    GateEvaluated,
    OperatorEvent,
    Pause,
    Phase,
    PhaseChanged,
    Promote,
    ReleaseRef,
    Resume,
    Rollback,
    RolloutState,
    Start,
    Supersede,
    Tick,
    WaveProgress,
)
from .plan import RolloutPlan
from .windows import in_any_window
from .work import DeriveFactory, Probe, Work

__all__ = [
    "DEVICE_STATES", "OUTCOMES", "PHASES", "Abort", "AssignRelease", "Audit", "DeriveFactory", "DeviceJoined",
    "DeviceOnline", "DeviceReport", "DeviceStatus", "Effect", "Event", "GateDecision", "GateEvaluated",
    "Pause", "Phase", "PhaseChanged", "Promote", "ReleaseRef", "Resume", "Rollback", "RolloutState", "Start",
    "Supersede", "Tick", "WaveProgress", "check_action", "judge_action", "new_rollout",
    "report_changes", "step", "step_using", "wave_counts",
]

log = logging.getLogger(__name__)

# --- construction and queries --------------------------------------------------------------------


def new_rollout(rollout_id: str, plan: RolloutPlan, *, release: ReleaseRef, previous: ReleaseRef | None,
                devices: Sequence[DeviceInfo], now: float) -> RolloutState:
    """Return a ``pending`` rollout with every targeted device placed in its wave (see membership)."""
    placed = assign_waves(plan, devices, rollout_id)
    online = {d.id: d.online for d in devices}
    return RolloutState(
        rollout_id=rollout_id, release=release, previous=previous, plan=plan, clock=now,
        devices=DeviceMap({d: DeviceStatus(wave=w, since=now, online=online[d])
                           for d, w in sorted(placed.items())}),
        waves=tuple(WaveProgress() for _ in plan.waves),
    )


def _index(state: RolloutState) -> FleetIndex:
    """The state's index, built (O(fleet)) when it has none describing its device map."""
    index = state.index
    if isinstance(index, FleetIndex) and index.owner is state.devices:
        return index
    index = FleetIndex.build(state.rollout_id, len(state.plan.waves), state.devices)
    object.__setattr__(state, "index", index)  # a cache of derived data, not part of the value
    return index


def wave_counts(state: RolloutState) -> list[dict[str, int]]:
    """Return, per wave, the number of devices in each device state (states with none left out)."""
    index = _index(state)
    return [index.counts(k) for k in range(len(state.plan.waves))]


def _action_key(event: Event) -> str:
    actor = getattr(event, "actor", getattr(event, "new_rollout_id", ""))
    return f"{type(event).__name__}|{actor}|{event.now!r}"


def check_action(state: RolloutState, event: Event) -> str | None:
    """Return why the operator ``event`` would change nothing now, or None when it applies.

    The action is judged against the rollout as it stands at the event's time: what fell due
    between the state's clock and ``event.now`` (timeouts, soaks, gates) counts, exactly as in
    :func:`step`. Device events and ticks always apply (None). The API uses this to answer a
    refused action. It builds its own index (O(fleet)) and leaves the state's alone;
    :func:`judge_action` judges and applies in one advance.
    """
    if not isinstance(event, OPERATOR):
        return None
    work = Work(state, event.now, lambda s: FleetIndex.build(s.rollout_id, len(s.plan.waves), s.devices))
    _advance(work)
    return _refusal(work, event)


def judge_action(state: RolloutState, event: OperatorEvent) -> tuple[str | None, RolloutState, list[Effect]]:
    """Return ``(refusal, state, effects)``: why the operator ``event`` changes nothing (with ``state``
    unchanged and no effects), or None with the result of :func:`step`. One advance serves both."""
    work = Work(state, event.now, _index)
    _advance(work)
    refusal = _refusal(work, event)
    if refusal is not None:
        return refusal, state, []
    work.seen_actions.append(_action_key(event))
    _operator(work, event)
    _advance(work)
    return None, work.freeze(), work.effects


def _refusal(w: Work, event: OperatorEvent) -> str | None:
    """Why the operator ``event`` changes nothing in ``w`` (already advanced to its time), or None."""
    phase = w.phase
    if _action_key(event) in w.seen_actions:
        return "this action was applied already"
    if w.superseded_by:
        return f"the rollout is {phase} and was superseded by rollout {w.superseded_by}"
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


def report_changes(state: RolloutState, event: DeviceReport) -> bool:
    """Tell whether ``event`` would change its device as ``state`` stands (before advancing to the
    event's time). The runner does not step a report that changes nothing: the tick's ``Tick``
    advances the rollout to the same time. O(1)."""
    probe = Probe(state, event.now)
    _report(probe, event)
    return probe.changed


def step(state: RolloutState, event: Event) -> tuple[RolloutState, list[Effect]]:
    """Apply ``event`` to ``state``; return the new state and the effects to carry out, in order.

    An operator action first advances the rollout to the action's time and is then judged (see
    :func:`check_action`); one the phase does not accept changes nothing beyond that advance.
    """
    return step_using(state, event, _index)


def step_using(state: RolloutState, event: Event, derive: DeriveFactory) -> tuple[RolloutState, list[Effect]]:
    """:func:`step` with the derived quantities of the devices kept by ``derive(state)`` (the tests
    compare the incremental index with a naive recomputation through this)."""
    work = Work(state, event.now, derive)
    if isinstance(event, OPERATOR):
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

def _operator(w: Work, e: OperatorEvent) -> None:
    if isinstance(e, Start):
        if w.plan.waves[0].pause_before:
            w.set_phase("waiting_approval", e.reason or "rollout started", e.actor, "start",
                        release=w.s.release.version, devices=w.device_count(),
                        waiting=f"approval before wave 1 ({w.plan.waves[0].name})")
            return
        w.set_phase("running", e.reason or "rollout started", e.actor, "start",
                    release=w.s.release.version, devices=w.device_count())
        _start_wave(w, 0)
    elif isinstance(e, Pause):
        w.paused_from = w.phase
        w.set_phase("paused", e.reason, e.actor, "pause")
    elif isinstance(e, Resume):
        target = _resumed(w.paused_from)
        w.paused_from = ""
        w.set_phase(target, e.reason, e.actor, "resume")
    elif isinstance(e, Promote):
        overridden = w.phase == "halted"
        if overridden:
            w.halted_reason, w.tripped = "", ()
            w.waves[w.wave] = replace(w.waves[w.wave], result="promoted")
        if w.waves[w.wave].started is None:  # approval before the first wave (pause_before)
            w.set_phase("running", e.reason or "promoted by an operator", e.actor, "promote")
            _start_wave(w, w.wave)
        else:
            _next_wave(w, e.actor, e.reason or "promoted by an operator", overridden_halt=overridden)
    elif isinstance(e, Abort):
        w.set_phase("aborted", e.reason, e.actor, "abort")
    elif isinstance(e, Rollback):
        _begin_rollback(w, e.reason, e.actor)
    else:
        w.superseded_by, w.superseded_at = e.new_rollout_id, w.now
        if w.phase in OUTCOME_PHASES:
            # A finished rollout keeps its outcome; it only stops serving late and returning devices.
            w.audit("system", "supersede", f"superseded by rollout {e.new_rollout_id}; its outcome stays "
                    f"{w.phase}", phase=w.phase, wave=w.wave, superseded_by=e.new_rollout_id)
        else:
            w.set_phase("superseded", f"superseded by rollout {e.new_rollout_id}", "system", "supersede",
                        superseded_by=e.new_rollout_id)


def _report(w: Work | Probe, e: DeviceReport) -> None:
    dev = w.get(e.device)
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
    if w.update(e.device, **changes) and changes.get("state") in FAILURES and dev.state != changes["state"]:
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


def _new_release_report(w: Work | Probe, dev: DeviceStatus, e: DeviceReport) -> dict[str, Any]:
    wave = w.plan.waves[dev.wave]
    changes: dict[str, Any] = {}
    if e.release_version is not None:
        changes["version"] = e.release_version
    if e.health and wave.gates and dev.wave == w.wave:
        metrics = extract_metrics(e.health, wave.gates)
        if metrics:
            changes["metrics"] = {**dev.metrics, **metrics}
    real_failure = dev.state in FAILURES and not dev.timed_out
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


def _online(w: Work, e: DeviceOnline) -> None:
    dev = w.get(e.device)
    if dev is None or dev.online == e.online:
        return
    changes: dict[str, Any] = {"online": e.online}
    if not e.online and dev.state == "assigned":
        changes.update(state="offline", since=w.now)
    elif e.online and dev.state == "offline":
        changes.update(state="assigned" if dev.target else "pending", since=w.now)
    w.update(e.device, **changes)


def _joined(w: Work, e: DeviceJoined) -> None:
    info = e.device_info
    if w.get(info.id) is not None:
        return
    wave = w.index.join_wave(w.plan, info, w.s.rollout_id)
    if wave == NOT_TARGETED:
        return
    w.add(info.id, DeviceStatus(wave=wave, since=w.now, online=info.online))
    w.audit(ENGINE, "device_joined", f"device {info.id} joined wave {wave}", device=info.id, wave=wave)


# --- advancing -------------------------------------------------------------------------------------


def _advance(w: Work) -> None:
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


def _dispatch(w: Work) -> bool:
    """Assign what the phase wants: assigning, the new release to the devices of the waves started so
    far; rolling back, the previous release to every device that took the new one. Offline devices
    still ``pending`` become ``offline``; online ones are assigned in (wave, hash) order within the
    rate limit and, assigning, the maintenance windows."""
    rollback = w.phase in ROLLBACK
    if (w.phase not in ASSIGNING and not rollback) or w.superseded_by:
        return False
    if not rollback and w.waves[w.wave].started is None:  # the first wave waits for its approval
        return False
    changed = False
    for device in w.index.offline_pending(rollback, w.wave):
        changed = w.update(device, state="offline", since=w.now) or changed
    count = w.index.candidates(rollback, w.wave)
    if not count:
        return changed
    if not rollback and not in_any_window(w.plan.maintenance_windows, w.now):
        return changed
    limit = w.plan.rate_limit_per_minute
    budget = count if limit is None else max(0, limit - len(w.recent))
    if budget <= 0:
        return changed
    ref = w.s.previous if rollback else w.s.release
    assert ref is not None
    wanted = "previous" if rollback else "new"
    for device in w.index.take(rollback, w.wave, budget):
        w.update(device, target=wanted, state="assigned", since=w.now, assigned_at=w.now, reason="",
                 timed_out=False)
        w.recent.append(w.now)
        w.effects.append(AssignRelease(device=device, version=ref.version, commit=ref.commit,
                                       rollout_id=w.s.rollout_id))
    return True


def _time_out(w: Work) -> bool:
    wave = w.plan.waves[w.wave]
    due = w.index.due(w.wave, w.now, wave.timeout)
    reason = f"no report within {wave.timeout}s"
    for device in due:
        if wave.offline == "failed":
            w.update(device, state="failed", reason=reason, since=w.now, timed_out=True)
        elif wave.offline == "skipped":
            w.update(device, state="skipped", reason=reason, since=w.now, timed_out=True)
        else:
            w.update(device, reason=reason, timed_out=True)
    return bool(due)


def _mark_reported(w: Work) -> bool:
    progress = w.waves[w.wave]
    if progress.all_reported is not None:
        return False
    if w.index.unsettled(w.wave):
        return False
    members = w.index.wave_size(w.wave)
    soak = w.plan.waves[w.wave].soak if members else 0
    w.waves[w.wave] = replace(progress, all_reported=w.now, soak_until=w.now + soak)
    w.audit(ENGINE, "wave_reported", f"every device of wave {w.wave} reported or timed out; soaking {soak}s",
            wave=w.wave, devices=members)
    return True


def _failure_result(w: Work) -> GateResult:
    return evaluate_failures(w.plan.waves[w.wave], reported=w.index.reported(w.wave),
                             failed=w.index.failed(w.wave))


def _fail_fast(w: Work) -> bool:
    if failure_gates_pass(w.plan.waves[w.wave], reported=w.index.reported(w.wave),
                          failures=w.index.failures(w.wave)):
        return False
    _decide(w, _failure_result(w))
    return True


def _end_soak(w: Work) -> bool:
    progress = w.waves[w.wave]
    if progress.soak_until is None or w.now < progress.soak_until or progress.result:
        return False
    wave = w.plan.waves[w.wave]
    samples = {d: s.metrics for d in w.index.members(w.wave) if (s := w.dev(d)).metrics}
    _decide(w, merge_results(_failure_result(w), evaluate_telemetry(wave.gates, samples)))
    return True


def _decide(w: Work, result: GateResult) -> None:
    k = w.wave
    wave = w.plan.waves[k]
    w.gates.append(GateDecision(wave=k, at=w.now, passed=result.passed, reasons=result.reasons,
                                tripped=result.tripped))
    w.effects.append(GateEvaluated(wave=k, passed=result.passed,
                                   detail={**(result.detail or {}), "reasons": list(result.reasons),
                                           "tripped": list(result.tripped)}))
    if result.passed:
        # a wave without devices proved nothing: it is "empty", not "passed"
        w.waves[k] = replace(w.waves[k], result="passed" if w.index.wave_size(k) else "empty")
        following = w.plan.waves[k + 1] if k + 1 < len(w.plan.waves) else None
        if wave.promotion == "manual" or (following is not None and following.pause_before):
            why = (f"; waiting for approval before wave {k + 2} ({following.name})"
                   if following is not None and following.pause_before else "; waiting for approval")
            w.set_phase("waiting_approval", f"wave {k + 1} ({wave.name}) passed{why}", ENGINE,
                        "wait_approval")
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


def _start_wave(w: Work, k: int) -> None:
    w.wave = k
    w.waves[k] = replace(w.waves[k], started=w.now)
    w.audit(ENGINE, "wave_started", f"wave {k + 1} ({w.plan.waves[k].name}) started", wave=k,
            devices=w.index.wave_size(k))


def _next_wave(w: Work, actor: str, reason: str = "", **detail: Any) -> None:
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


def _begin_rollback(w: Work, reason: str, actor: str, **detail: Any) -> None:
    w.rollback_started = w.now
    previous = w.s.previous
    assert previous is not None
    w.set_phase("rolling_back", reason, actor, "rollback", to_version=previous.version, **detail)


def _rollback_timeout(w: Work) -> int:
    return max(wave.timeout for wave in w.plan.waves[: w.wave + 1])


def _finish_rollback(w: Work) -> bool:
    started = w.rollback_started if w.rollback_started is not None else w.now
    if w.index.rollback_waiting() and w.now < started + _rollback_timeout(w):
        return False
    devices = ((d, w.dev(d)) for k in range(len(w.plan.waves)) for d in w.index.members(k))
    involved = [(d, s) for d, s in devices if s.target in ("new", "previous")]
    waiting = sorted(d for d, s in involved
                     if s.target == "new" or s.state in ("assigned", "offline", "pending"))
    w.set_phase("rolled_back", "every device that took the release was sent back" if not waiting else
                "rollback timeout: some devices have not confirmed yet", ENGINE, "rolled_back",
                unconfirmed=waiting, devices=len(involved))
    return True


def _resumed(paused_from: str) -> Phase:
    """The phase a resumed rollout returns to: the one it was paused from (``running`` if unknown)."""
    for phase in PHASES:
        if phase == paused_from:
            return phase
    return "running"
