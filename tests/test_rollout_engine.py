"""The rollout state machine, driven by events with frozen times; devices answer like agents would."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts.engine import (
    Abort,
    AssignRelease,
    Audit,
    DeviceJoined,
    DeviceOnline,
    DeviceReport,
    Effect,
    Event,
    GateEvaluated,
    Pause,
    PhaseChanged,
    Promote,
    ReleaseRef,
    Resume,
    Rollback,
    RolloutState,
    Start,
    Supersede,
    Tick,
    check_action,
    new_rollout,
    step,
    wave_counts,
)
from fleet_server.rollouts.membership import DeviceInfo
from fleet_server.rollouts.plan import parse_plan

T0 = datetime(2024, 5, 6, 1, 0, tzinfo=UTC).timestamp()
NEW = ReleaseRef(7, "a" * 40)
OLD = ReleaseRef(6, "b" * 40)
THREE_WAVES: dict[str, Any] = {"waves": [
    {"name": "canary", "soak": 60, "timeout": 120},
    {"name": "half", "percent": 50, "soak": 60, "timeout": 120},
    {"name": "all", "percent": 100, "soak": 60, "timeout": 120},
]}


def _make(raw: dict[str, Any], n: int = 24, canaries: int = 2, offline: Iterable[str] = (),
          previous: ReleaseRef | None = OLD) -> RolloutState:
    plan = parse_plan(raw, source="rollouts/test.yaml")
    off = set(offline)
    devices = [DeviceInfo(f"dev-{i:02d}", {"canary": "true"} if i < canaries else {"site": "a"},
                          online=f"dev-{i:02d}" not in off) for i in range(n)]
    return new_rollout("r1", plan, release=NEW, previous=previous, devices=devices, now=T0)


Responder = Callable[[AssignRelease, float], list[Event]]


def healthy(effect: AssignRelease, now: float) -> list[Event]:
    return [DeviceReport(effect.device, now + 1, "applied", effect.version)]


class Driver:
    """Feeds events, answers assignments through ``respond`` and keeps every effect."""

    def __init__(self, state: RolloutState, respond: Responder = healthy) -> None:
        self.state = state
        self.respond = respond
        self.effects: list[Effect] = []
        self.now = T0

    def send(self, event: Event) -> list[Effect]:
        self.state, effects = step(self.state, event)
        self.effects.extend(effects)
        for effect in effects:
            if isinstance(effect, AssignRelease):
                for answer in self.respond(effect, event.now):
                    self.send(answer)
        return effects

    def run_until(self, done: Callable[[RolloutState], bool], *, every: float = 30, limit: int = 400) -> None:
        for _ in range(limit):
            if done(self.state):
                return
            self.now += every
            self.send(Tick(self.now))
        raise AssertionError(f"not done after {limit} ticks: phase {self.state.phase}")

    def assigned(self, version: int | None = None) -> list[str]:
        return [e.device for e in self.effects if isinstance(e, AssignRelease)
                and (version is None or e.version == version)]


def _phase(*phases: str) -> Callable[[RolloutState], bool]:
    return lambda s: s.phase in phases


def test_all_healthy_three_waves_succeed_in_wave_order() -> None:
    d = Driver(_make(THREE_WAVES))
    d.send(Start(T0, actor="alice", reason="release 7"))
    d.run_until(_phase("succeeded", "halted", "rolling_back"))
    assert d.state.phase == "succeeded"
    assigned = d.assigned(NEW.version)
    assert sorted(assigned) == sorted(d.state.devices)  # every device, exactly once
    waves = [d.state.devices[x].wave for x in assigned]
    assert waves == sorted(waves)
    assert {d.state.devices[x].wave for x in ("dev-00", "dev-01")} == {0}
    assert all(s.state == "applied" for s in d.state.devices.values())
    assert [w.result for w in d.state.waves] == ["passed", "passed", "passed"]
    assert [g.passed for g in d.state.gates] == [True, True, True]
    phases = [(e.old, e.new) for e in d.effects if isinstance(e, PhaseChanged)]
    assert phases == [("pending", "running"), ("running", "succeeded")]
    start = next(e for e in d.effects if isinstance(e, Audit) and e.action == "start")
    assert (start.actor, start.reason, start.at) == ("alice", "release 7", T0)
    # a wave's soak starts only once every device reported
    for progress in d.state.waves:
        assert progress.all_reported is not None
        assert progress.soak_until == progress.all_reported + 60


def _canary_fails(effect: AssignRelease, now: float) -> list[Event]:
    if effect.device == "dev-00" and effect.version == NEW.version:
        return [DeviceReport("dev-00", now + 1, "applied", NEW.version),
                DeviceReport("dev-00", now + 20, "health_failed", NEW.version,
                             {"checks": [{"name": "app", "ok": False}]})]
    return healthy(effect, now)


def test_failing_canary_rolls_back_and_later_waves_never_get_the_release() -> None:
    raw = {**THREE_WAVES, "rollback_on_failure": True}
    d = Driver(_make(raw), _canary_fails)
    d.send(Start(T0))
    d.run_until(_phase("rolled_back", "succeeded"))
    assert d.state.phase == "rolled_back"
    assert d.state.tripped == ("dev-00",)
    assert "health check failed" not in d.state.halted_reason  # the reason is the gate's
    assert "wave 1 (canary) failed" in d.state.halted_reason
    later = {x for x, s in d.state.devices.items() if s.wave > 0}
    assert not later & set(d.assigned(NEW.version))
    assert sorted(d.assigned(OLD.version)) == ["dev-00", "dev-01"]
    assert all(d.state.devices[x].state == "rolled_back" for x in ("dev-00", "dev-01"))
    assert d.state.waves[0].result == "failed"


def test_failing_canary_halts_when_the_plan_says_halt() -> None:
    d = Driver(_make(THREE_WAVES), _canary_fails)
    d.send(Start(T0))
    d.run_until(_phase("halted", "succeeded"))
    assert d.state.phase == "halted"
    assert d.state.wave == 0
    assert d.state.tripped == ("dev-00",)
    assert d.assigned(OLD.version) == []
    gate = [e for e in d.effects if isinstance(e, GateEvaluated)]
    assert [g.passed for g in gate] == [False]
    assert gate[0].detail["tripped"] == ["dev-00"]
    halt = [e for e in d.effects if isinstance(e, Audit) and e.action == "halt"]
    assert halt[0].actor == "engine"
    assert halt[0].detail["tripped"] == ["dev-00"]
    # the operator can override a halted wave
    d.send(Promote("bob", "known flaky check", d.now + 1))
    assert d.state.phase == "running"
    assert d.state.wave == 1


def _fails(devices: set[str]) -> Responder:
    def respond(effect: AssignRelease, now: float) -> list[Event]:
        outcome = "failed" if effect.device in devices else "applied"
        return [DeviceReport(effect.device, now + 1, outcome, effect.version)]
    return respond


def test_failure_rate_under_threshold_continues() -> None:
    raw = {"canary_first": False, "waves": [
        {"count": 2, "soak": 10}, {"percent": 100, "soak": 10, "max_failure_rate": 0.1}]}
    state = _make(raw, n=22)
    second = sorted(x for x, s in state.devices.items() if s.wave == 1)
    d = Driver(state, _fails({second[3]}))
    d.send(Start(T0))
    d.run_until(_phase("succeeded", "halted"))
    assert d.state.phase == "succeeded"
    assert d.state.devices[second[3]].state == "failed"
    assert d.state.gates[-1].passed


def test_min_reported_is_respected_before_the_rate_is_judged() -> None:
    raw = {"canary_first": False, "waves": [
        {"count": 8, "soak": 10, "max_failure_rate": 0.1, "min_reported": 5}, {"percent": 100}]}
    state = _make(raw, n=10)
    first = sorted(x for x, s in state.devices.items() if s.wave == 0)
    d = Driver(state, lambda e, now: [])
    d.send(Start(T0))
    assert sorted(d.assigned()) == first
    d.send(DeviceReport(first[0], T0 + 1, "failed", NEW.version))
    assert d.state.phase == "running"  # 1 of 1 failed, but fewer than 5 reported
    for i, device in enumerate(first[1:4]):
        d.send(DeviceReport(device, T0 + 2 + i, "applied", NEW.version))
    assert d.state.phase == "running"
    d.send(DeviceReport(first[4], T0 + 9, "applied", NEW.version))
    assert d.state.phase == "halted"  # 1/5 = 0.2 > 0.1
    assert d.state.tripped == (first[0],)


def test_offline_device_counts_per_rule_after_timeout_and_gets_its_release_when_back() -> None:
    raw = {"canary_first": False, "waves": [
        {"count": 4, "soak": 10, "timeout": 300, "offline": "failed", "max_failures": 1,
         "max_failure_rate": None},
        {"percent": 100, "soak": 10}]}
    probe = _make(raw, n=10)
    gone = sorted(x for x, s in probe.devices.items() if s.wave == 0)[1]
    d = Driver(_make(raw, n=10, offline=[gone]))
    d.send(Start(T0))
    assert gone not in d.assigned()
    assert d.state.devices[gone].state == "offline"
    d.now = T0 + 240
    d.send(Tick(d.now))
    assert d.state.wave == 0  # still waiting: the timeout has not passed
    d.run_until(lambda s: s.wave == 1, every=30)
    assert d.state.devices[gone].state == "failed"
    assert "no report" in d.state.devices[gone].reason
    d.send(DeviceOnline(gone, True, d.now + 1))
    assert d.assigned().count(gone) == 1
    assert d.state.devices[gone].state == "applied"  # answered by the healthy responder
    d.run_until(_phase("succeeded"))


def test_offline_pending_rule_does_not_wedge_and_does_not_count() -> None:
    raw = {"canary_first": False,
           "waves": [{"count": 3, "soak": 0, "timeout": 60}, {"percent": 100, "soak": 0}]}
    probe = _make(raw, n=6)
    gone = sorted(x for x, s in probe.devices.items() if s.wave == 0)[0]
    d = Driver(_make(raw, n=6, offline=[gone]))
    d.send(Start(T0))
    d.run_until(_phase("succeeded"), every=20)
    assert d.state.devices[gone].state == "offline"
    assert d.state.devices[gone].timed_out
    d.send(DeviceOnline(gone, True, d.now + 5))
    assert d.state.devices[gone].state == "applied"


def test_deferred_device_is_shown_deferred_not_failed() -> None:
    def respond(effect: AssignRelease, now: float) -> list[Event]:
        if effect.device == "dev-01":
            return [DeviceReport("dev-01", now + 1, "deferred", None)]
        return healthy(effect, now)
    d = Driver(_make(THREE_WAVES), respond)
    d.send(Start(T0))
    d.run_until(_phase("succeeded", "halted"))
    assert d.state.phase == "succeeded"
    assert d.state.devices["dev-01"].state == "deferred"
    assert wave_counts(d.state)[0] == {"applied": 1, "deferred": 1}


def test_manual_promotion_waits_for_promote() -> None:
    raw = {"waves": [{"name": "canary", "soak": 10, "promotion": "manual"}, {"percent": 100, "soak": 10}]}
    d = Driver(_make(raw))
    d.send(Start(T0))
    d.run_until(_phase("waiting_approval"))
    for _ in range(20):
        d.now += 3600
        d.send(Tick(d.now))
    assert d.state.phase == "waiting_approval"
    assert d.state.wave == 0
    assert check_action(d.state, Promote("bob", "ok", d.now, wave=1)) is not None
    d.send(Promote("bob", "looks good", d.now, wave=0))
    assert d.state.wave == 1
    promote = [e for e in d.effects if isinstance(e, Audit) and e.action == "promote"]
    assert (promote[0].actor, promote[0].reason) == ("bob", "looks good")
    d.run_until(_phase("succeeded"))


def _roundtrip(state: RolloutState) -> RolloutState:
    return RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))


def test_state_survives_a_restart_mid_wave_and_continues_identically() -> None:
    raw = {**THREE_WAVES, "rate_limit_per_minute": 4,
           "maintenance_windows": [{"cron": "0 * * * *", "duration": "50m"}]}
    raw["waves"][1] = {**raw["waves"][1], "gates": [{"metric": "memory_percent", "op": "<", "value": 90}]}
    events: list[Event] = [Start(T0)]
    state = _make(raw)
    for i in range(1, 120):
        events.append(Tick(T0 + 30 * i))
        for x in sorted(state.devices)[i % 24: i % 24 + 3]:
            events.append(DeviceReport(x, T0 + 30 * i + 1, "applied", NEW.version,
                                       {"metrics": {"memory_percent": 40.0 + i % 7}}))
    for cut in (5, 40, 90, 200):
        a = b = state
        for n, event in enumerate(events):
            if n == cut:
                b = _roundtrip(b)
                assert b == a
            a, fa = step(a, event)
            b, fb = step(b, event)
            assert fa == fb
        assert a == b
    assert a.phase == "succeeded"


def test_rate_limit_spreads_assignments() -> None:
    raw = {"canary_first": False, "rate_limit_per_minute": 5, "waves": [{"percent": 100, "soak": 0}]}
    d = Driver(_make(raw, n=20), lambda e, now: [])
    d.send(Start(T0))
    assert len(d.assigned()) == 5
    d.send(Tick(T0 + 30))
    assert len(d.assigned()) == 5
    d.send(Tick(T0 + 60))
    assert len(d.assigned()) == 10
    d.send(Tick(T0 + 179))
    assert len(d.assigned()) == 15
    d.send(Tick(T0 + 240))
    assert len(d.assigned()) == 20


def test_maintenance_window_blocks_assignments_outside_it() -> None:
    raw = {"canary_first": False, "maintenance_windows": [{"cron": "0 2 * * *", "duration": "1h"}],
           "waves": [{"count": 2, "soak": 0}, {"percent": 100, "soak": 0}]}
    d = Driver(_make(raw, n=6))
    d.send(Start(T0))  # 01:00 UTC
    d.send(Tick(T0 + 3599))
    assert d.assigned() == []
    d.send(Tick(T0 + 3600))  # 02:00 UTC
    assert d.state.phase == "succeeded"
    assert len(d.assigned()) == 6


def test_a_window_closing_mid_rollout_holds_the_next_wave() -> None:
    raw = {"canary_first": False, "maintenance_windows": [{"cron": "0 1 * * *", "duration": "10m"}],
           "waves": [{"count": 2, "soak": "15m"}, {"percent": 100, "soak": 0}]}
    d = Driver(_make(raw, n=6))
    d.send(Start(T0))
    d.run_until(lambda s: s.wave == 1, every=60)
    assert len(d.assigned()) == 2
    assert d.state.wave == 1
    d.run_until(_phase("succeeded"), every=300)
    assert d.now > T0 + 86400  # held until the next day's window
    assert len(d.assigned()) == 6


def test_supersede_stops_assignments() -> None:
    d = Driver(_make(THREE_WAVES))
    d.send(Start(T0))
    d.send(Supersede("r2", T0 + 5))
    assert d.state.phase == "superseded"
    assert d.state.superseded_by == "r2"
    before = len(d.assigned())
    for i in range(10):
        d.send(Tick(T0 + 600 * (i + 1)))
    d.send(DeviceOnline("dev-10", False, T0 + 7000))
    d.send(DeviceOnline("dev-10", True, T0 + 7001))
    assert len(d.assigned()) == before


def test_a_succeeded_rollout_keeps_its_outcome_when_superseded() -> None:
    d = Driver(_make(THREE_WAVES))
    d.send(Start(T0))
    d.run_until(_phase("succeeded"), every=30)
    effects = d.send(Supersede("r2", d.now + 5))
    assert d.state.phase == "succeeded"
    assert (d.state.superseded_by, d.state.superseded_at) == ("r2", d.now + 5)
    assert not [e for e in effects if isinstance(e, PhaseChanged)]
    audits = [e for e in effects if isinstance(e, Audit)]
    assert [(a.action, a.detail["phase"], a.detail["superseded_by"]) for a in audits] == \
        [("supersede", "succeeded", "r2")]
    assert RolloutState.from_dict(json.loads(json.dumps(d.state.to_dict()))) == d.state
    # a superseded rollout serves no late device and takes no action any more
    before = len(d.assigned())
    d.send(DeviceJoined(DeviceInfo("dev-late", {"site": "a"}), d.now + 10))
    d.send(Tick(d.now + 600))
    assert len(d.assigned()) == before
    refusal = check_action(d.state, Rollback("bob", "undo", d.now + 1))
    assert refusal == "the rollout is succeeded and was superseded by rollout r2"


@pytest.mark.parametrize(("gated", "soaks"), [(0, (60, 60, 60)), (1, (60, 60, 60)), (2, (60, 60, 60)),
                                             (1, (0, 0, 0)), (2, (0, 0, 0))])
def test_pause_before_assigns_no_device_of_the_gated_wave_before_approval(gated: int,
                                                                          soaks: tuple[int, ...]) -> None:
    raw = {"waves": [{**w, "soak": soak} for w, soak in zip(THREE_WAVES["waves"], soaks, strict=True)]}
    raw["waves"][gated]["pause_before"] = True
    d = Driver(_make(raw))
    d.send(Start(T0))
    d.run_until(_phase("waiting_approval"), every=30)
    gated_devices = {x for x, s in d.state.devices.items() if s.wave == gated}
    for _ in range(40):  # time passes: still nothing of the gated wave, whatever is due
        d.now += 600
        d.send(Tick(d.now))
        d.send(DeviceOnline(sorted(gated_devices)[0], False, d.now + 1))
        d.send(DeviceOnline(sorted(gated_devices)[0], True, d.now + 2))
    assert d.state.phase == "waiting_approval"
    assert not gated_devices & set(d.assigned())
    assert {d.state.devices[x].state for x in gated_devices} == {"pending"}
    assert d.state.waves[gated].started is None
    assert all(d.state.waves[k].result == "passed" for k in range(gated))
    d.send(Promote("erin", "approved", d.now + 10))
    d.run_until(_phase("succeeded"), every=30)
    assert gated_devices <= set(d.assigned())
    waits = [e for e in d.effects if isinstance(e, PhaseChanged) and e.new == "waiting_approval"]
    assert len(waits) == 1
    assert f"before wave {gated + 1} ({raw['waves'][gated]['name']})" in \
        next(a.detail.get("waiting", a.reason) for a in d.effects
             if isinstance(a, Audit) and a.detail.get("new") == "waiting_approval")


def test_a_wave_left_empty_by_its_percent_is_empty_not_passed() -> None:
    # 3 canaries of 30: a 2 % wave wants ceil(0.6) = 1 device in it and the waves before it: none left
    raw = {"waves": [{"name": "canary", "soak": 0}, {"name": "tiny", "percent": 2, "soak": 0},
                     {"name": "all", "percent": 100, "soak": 0, "pause_before": True}]}
    d = Driver(_make(raw, n=30, canaries=3))
    d.send(Start(T0))
    d.run_until(_phase("waiting_approval"), every=30)
    assert [w.result for w in d.state.waves] == ["passed", "empty", ""]
    assert not [x for x, s in d.state.devices.items() if s.wave == 1]


def test_pause_resume_abort_and_operator_rollback() -> None:
    d = Driver(_make(THREE_WAVES))
    d.send(Start(T0))
    d.send(Pause("carol", "investigating", T0 + 1))
    d.run_until(lambda s: s.clock > T0 + 3000)
    assert d.state.phase == "paused"
    assert d.state.wave == 0
    d.send(Resume("carol", "fine", d.now))
    assert d.state.phase == "running"
    d.run_until(lambda s: s.wave == 1)
    d.send(Rollback("carol", "customer report", d.now + 1))
    assert d.state.phase in ("rolling_back", "rolled_back")
    d.run_until(_phase("rolled_back"))
    took_new = set(d.assigned(NEW.version))
    assert set(d.assigned(OLD.version)) == took_new
    assert check_action(d.state, Abort("carol", "done", d.now)) is not None
    fresh = Driver(_make(THREE_WAVES))
    fresh.send(Start(T0))
    fresh.send(Abort("dave", "wrong release", T0 + 2))
    fresh.run_until(lambda s: s.clock > T0 + 3000)
    assert fresh.state.phase == "aborted"
    assert len(fresh.assigned()) == 2


def test_rollback_without_previous_release_halts() -> None:
    d = Driver(_make({**THREE_WAVES, "rollback_on_failure": True}, previous=None), _canary_fails)
    d.send(Start(T0))
    d.run_until(_phase("halted", "succeeded"))
    assert d.state.phase == "halted"
    assert "no previous release" in d.state.halted_reason
    assert check_action(d.state, Rollback("x", "y", d.now)) == "there is no previous release to roll back to"


def test_telemetry_gate_fails_the_wave_at_soak_end() -> None:
    raw = {"waves": [{"name": "canary", "soak": 60, "gates": [
        {"metric": "memory_percent", "op": "<", "value": 80}]}, {"percent": 100, "soak": 0}]}

    def respond(effect: AssignRelease, now: float) -> list[Event]:
        memory = 95.0 if effect.device == "dev-01" else 30.0
        return [DeviceReport(effect.device, now + 1, "applied", effect.version),
                DeviceReport(effect.device, now + 30, "applied", effect.version,
                             {"metrics": {"memory_percent": memory}, "checks": []})]
    d = Driver(_make(raw), respond)
    d.send(Start(T0))
    d.run_until(_phase("halted", "succeeded"))
    assert d.state.phase == "halted"
    assert d.state.tripped == ("dev-01",)
    assert "memory_percent" in d.state.halted_reason


def test_joined_device_gets_its_wave() -> None:
    d = Driver(_make(THREE_WAVES))
    d.send(Start(T0))
    d.run_until(_phase("succeeded"))
    d.send(DeviceJoined(DeviceInfo("late-1", {"site": "a"}), d.now + 1))
    assert "late-1" in d.state.devices
    assert d.assigned()[-1] == "late-1"


# --- properties -----------------------------------------------------------------------------------

_DEVICES = [f"dev-{i:02d}" for i in range(8)]
_RAW: dict[str, Any] = {"rate_limit_per_minute": 3, "waves": [
    {"name": "c", "soak": 30, "timeout": 60, "offline": "failed", "max_failures": 1,
     "max_failure_rate": None},
    {"percent": 50, "soak": 0, "timeout": 60, "promotion": "manual", "on_failure": "rollback",
     "gates": [{"metric": "check:app"}]},
    {"percent": 100, "soak": 30, "timeout": 60, "offline": "skipped", "max_failure_rate": 0.5}]}

_device = st.sampled_from([*_DEVICES, "stranger"])
_delta = st.floats(min_value=0, max_value=400, allow_nan=False)
_events = st.one_of(
    st.builds(lambda dt: ("start", dt), _delta),
    st.builds(lambda dt: ("tick", dt), _delta),
    st.builds(lambda dev, dt, out, ver, ok: ("report", dt, dev, out, ver, ok), _device, _delta,
              st.sampled_from(["applied", "failed", "refused", "rolled_back", "health_failed", "deferred"]),
              st.sampled_from([NEW.version, OLD.version, None, 3]), st.booleans()),
    st.builds(lambda dev, on, dt: ("online", dt, dev, on), _device, st.booleans(), _delta),
    st.builds(lambda i, dt: ("join", dt, i), st.integers(0, 3), _delta),
    st.builds(lambda kind, dt: (kind, dt), st.sampled_from(["pause", "resume", "promote", "abort", "rollback",
                                                            "supersede"]), _delta),
)


def _event(spec: tuple[Any, ...], now: float) -> Event:
    kind = spec[0]
    if kind == "start":
        return Start(now)
    if kind == "tick":
        return Tick(now)
    if kind == "report":
        health = {"checks": [{"name": "app", "ok": spec[5]}], "metrics": {}}
        return DeviceReport(spec[2], now, spec[3], spec[4], health)
    if kind == "online":
        return DeviceOnline(spec[2], spec[3], now)
    if kind == "join":
        return DeviceJoined(DeviceInfo(f"new-{spec[2]}", {"canary": "true"} if spec[2] == 0 else {}), now)
    if kind == "supersede":
        return Supersede("r2", now)
    actions: dict[str, type[Pause | Resume | Promote | Abort | Rollback]] = {
        "pause": Pause, "resume": Resume, "promote": Promote, "abort": Abort, "rollback": Rollback}
    return actions[kind]("op", kind, now)


def _prop_rollout() -> RolloutState:
    plan = parse_plan(_RAW, source="rollouts/prop.yaml")
    devices = [DeviceInfo(x, {"canary": "true"} if x == "dev-00" else {}, online=x != "dev-07")
               for x in _DEVICES]
    return new_rollout("r1", plan, release=NEW, previous=OLD, devices=devices, now=T0)


def _replay(specs: list[tuple[Any, ...]]) -> tuple[RolloutState, Event]:
    """Step every spec but the last one; return the state before the last and the last event."""
    state, now = _prop_rollout(), T0
    for spec in specs[:-1]:
        now += spec[1]
        state = step(state, _event(spec, now))[0]
    return state, _event(specs[-1], now + specs[-1][1])


def test_promote_is_judged_after_what_fell_due_before_it_and_replays_as_a_no_op() -> None:
    # wave 0 passes at T0+90 and wave 1 starts; its devices time out at T0+150, so at the moment
    # of the Promote wave 1 has passed (no soak) and waits for approval
    before, promote = _replay([("start", 0.0), ("start", 60.0), ("start", 30.0), ("promote", 60.0)])
    assert (before.phase, before.wave) == ("running", 1)
    assert check_action(before, promote) is None
    once, effects = step(before, promote)
    assert (once.phase, once.wave) == ("running", 2)
    changes = [(e.old, e.new) for e in effects if isinstance(e, PhaseChanged)]
    assert changes == [("running", "waiting_approval"), ("waiting_approval", "running")]
    assert step(once, promote) == (once, [])
    assert check_action(once, promote) == "this action was applied already"


def test_a_report_stamped_before_its_devices_assignment_is_not_its_answer() -> None:
    # dev-01 (wave 1) reports at T0+90, the instant wave 1 starts and assigns it the release
    before, report = _replay([("start", 0.0), ("start", 60.0),
                              ("report", 30.0, "dev-01", "applied", NEW.version, False)])
    assert isinstance(report, DeviceReport)
    assert before.devices["dev-01"].target == ""
    once, effects = step(before, report)
    assert AssignRelease("dev-01", NEW.version, NEW.commit, "r1") in effects
    assert once.devices["dev-01"].state == "assigned"
    assert step(once, report) == (once, [])
    later = step(once, DeviceReport("dev-01", report.now + 1, "applied", NEW.version))[0]
    assert later.devices["dev-01"].state == "applied"


@settings(max_examples=120, deadline=None)
@given(specs=st.lists(_events, max_size=40))
def test_random_event_sequences_never_crash_and_every_event_is_idempotent(specs: list[tuple[Any, ...]]) \
        -> None:
    state = _prop_rollout()
    now = T0
    assigned_new: set[str] = set()
    for spec in specs:
        now += spec[1]
        event = _event(spec, now)
        refusal = check_action(state, event)
        once, effects = step(state, event)
        twice, again = step(once, event)
        assert twice == once
        assert again == []
        if isinstance(event, Start | Pause | Resume | Promote | Abort | Rollback | Supersede):
            # the API's answer agrees with the step: an action is applied exactly when not refused
            assert (refusal is None) == (once.seen_actions != state.seen_actions)
            assert check_action(once, event) is not None
            # judging at the action's time: the same as a tick at that time followed by the action
            assert step(step(state, Tick(event.now))[0], event)[0] == once
        for effect in effects:
            if isinstance(effect, AssignRelease) and effect.version == NEW.version:
                assigned_new.add(effect.device)
            if isinstance(effect, AssignRelease):
                assert effect.version in (NEW.version, OLD.version)
                assert effect.version == NEW.version or effect.device in assigned_new
        state = once
        assert _roundtrip(state) == state
        assert state.phase in ("pending", "running", "waiting_approval", "paused", "halted", "rolling_back",
                               "rolled_back", "succeeded", "aborted", "superseded")
        assert all(s.wave <= state.wave or s.target != "new" for s in state.devices.values())
