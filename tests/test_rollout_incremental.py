"""The incremental engine decides exactly what a naive recomputation over every device decides.

The engine keeps the quantities it judges (per-wave counts, failures, devices waiting for an
assignment or past their timeout, hash order for joins) up to date per changed device
(``fleet_server.rollouts.index.FleetIndex``). :class:`NaiveDerived` below recomputes each of them
from the whole device map on every question, as the engine did before. Random plans, fleets and
event sequences (reports, online/offline, joins, operator actions, ticks) are run through both;
after every step the phase, wave, device states, gates and effects must be the same, and the
incremental counts must equal a recount.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.rollouts.devicemap import DeviceMap
from fleet_server.rollouts.engine import (
    Abort,
    AssignRelease,
    DeviceJoined,
    DeviceOnline,
    DeviceReport,
    DeviceStatus,
    Event,
    Pause,
    Promote,
    ReleaseRef,
    Resume,
    Rollback,
    RolloutState,
    Start,
    Tick,
    check_action,
    judge_action,
    new_rollout,
    step,
    step_using,
    wave_counts,
)
from fleet_server.rollouts.membership import NOT_TARGETED, DeviceInfo, hash_key, wave_of_new_device
from fleet_server.rollouts.plan import RolloutPlan, parse_plan

NEW = ReleaseRef(7, "a" * 40)
OLD = ReleaseRef(6, "b" * 40)
T0 = 1_700_000_000.0
_FAILURES = ("failed", "refused", "rolled_back")
_SETTLED = ("applied", "deferred", "skipped", *_FAILURES)


class NaiveDerived:
    """Every derived quantity recomputed from the whole device map (the reference)."""

    def __init__(self, state: RolloutState) -> None:
        self.devices: dict[str, DeviceStatus] = dict(state.devices)
        self.rollout_id = state.rollout_id

    def change(self, device: str, old: DeviceStatus | None, new: DeviceStatus) -> None:
        assert (old is None) == (device not in self.devices)
        self.devices[device] = new

    def members(self, wave: int) -> Sequence[str]:
        return [d for d, s in self.devices.items() if s.wave == wave]

    def wave_size(self, wave: int) -> int:
        return len(self.members(wave))

    def counts(self, wave: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.members(wave):
            out[self.devices[d].state] = out.get(self.devices[d].state, 0) + 1
        return out

    def unsettled(self, wave: int) -> int:
        return sum(1 for d in self.members(wave)
                   if not (self.devices[d].state in _SETTLED or self.devices[d].timed_out))

    def reported(self, wave: int) -> int:
        return sum(1 for d in self.members(wave) if self.devices[d].state in ("applied", *_FAILURES))

    def failed(self, wave: int) -> list[str]:
        return [d for d in self.members(wave) if self.devices[d].state in _FAILURES]

    def failures(self, wave: int) -> int:
        return len(self.failed(wave))

    def due(self, wave: int, now: float, timeout: int) -> list[str]:
        out = []
        for d in self.members(wave):
            s = self.devices[d]
            if s.timed_out or s.state not in ("assigned", "offline"):
                continue
            start = s.assigned_at if s.target == "new" and s.assigned_at is not None else s.since
            if not now < start + timeout:
                out.append(d)
        return out

    def _wants(self, rollback: bool, upto: int) -> list[tuple[str, DeviceStatus]]:
        if rollback:
            return [(d, s) for d, s in self.devices.items() if s.target == "new"]
        return [(d, s) for d, s in self.devices.items() if s.wave <= upto and s.target != "new"]

    def offline_pending(self, rollback: bool, upto: int) -> list[str]:
        return [d for d, s in self._wants(rollback, upto) if not s.online and s.state == "pending"]

    def candidates(self, rollback: bool, upto: int) -> int:
        return sum(1 for _, s in self._wants(rollback, upto) if s.online)

    def take(self, rollback: bool, upto: int, n: int) -> list[str]:
        online = [(s.wave, hash_key(d, self.rollout_id), d)
                  for d, s in self._wants(rollback, upto) if s.online]
        return [d for _, _, d in sorted(online)[:n]]

    def rollback_waiting(self) -> bool:
        waiting = ("assigned", "offline", "pending")
        return any(s.target == "new" or (s.target == "previous" and s.state in waiting)
                   for s in self.devices.values())

    def join_wave(self, plan: RolloutPlan, info: DeviceInfo, rollout_id: str) -> int:
        return wave_of_new_device(plan, info, rollout_id, {d: s.wave for d, s in self.devices.items()})


def _wave(draw: st.DrawFn, index: int, last: bool, percent: int) -> dict[str, Any]:
    wave: dict[str, Any] = {"soak": draw(st.sampled_from([0, 20, 60])),
                            "timeout": draw(st.sampled_from([1, 30, 90])),
                            "offline": draw(st.sampled_from(["pending", "failed", "skipped"])),
                            "promotion": draw(st.sampled_from(["auto", "auto", "manual"])),
                            "on_failure": draw(st.sampled_from(["halt", "rollback"]))}
    if not last:
        if draw(st.booleans()):
            wave["percent"] = percent
        elif index:
            wave["count"] = draw(st.integers(1, 12))
    failures = draw(st.sampled_from([None, 0, 1, 3]))
    if failures is not None:
        wave["max_failures"] = failures
    wave["max_failure_rate"] = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    wave["min_reported"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        wave["gates"] = [{"metric": "memory_percent", "op": "<", "value": 80}]
    return wave


@st.composite
def _plans(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 4))
    percents = sorted(draw(st.lists(st.integers(1, 99), min_size=count, max_size=count)))
    raw: dict[str, Any] = {"waves": [_wave(draw, i, i == count - 1, percents[i]) for i in range(count)]}
    if count > 1:
        raw["waves"][-1]["percent"] = 100
    if draw(st.booleans()):
        raw["rate_limit_per_minute"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        raw["target"] = {"labels": {"site": "a"}}
    return raw


def _device(i: int, online: bool = True) -> DeviceInfo:
    labels = {"canary": "true", "site": "a"} if i % 11 == 0 else {"site": "a" if i % 5 else "b"}
    return DeviceInfo(f"dev-{i:03d}", labels, online=online)


_OUTCOMES = ("applied", "applied", "applied", "failed", "refused", "rolled_back", "health_failed", "deferred")

_events = st.lists(st.one_of(
    st.tuples(st.just("report"), st.integers(0, 59), st.sampled_from(_OUTCOMES),
              st.sampled_from([7, 7, 6, None]), st.sampled_from([None, 40.0, 95.0])),
    st.tuples(st.just("online"), st.integers(0, 59), st.booleans()),
    st.tuples(st.just("join"), st.integers(40, 79), st.booleans()),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 5.0, 31.0, 70.0])),
    st.tuples(st.just("answer")),
    st.tuples(st.just("flap"), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("op"), st.sampled_from(["pause", "resume", "promote", "abort", "rollback"])),
), min_size=1, max_size=70)


def _event(spec: tuple[Any, ...], now: float, assigned: list[AssignRelease]) -> list[Event]:
    kind = spec[0]
    if kind == "report":
        _, i, outcome, version, memory = spec
        health = None if memory is None else {"metrics": {"memory_percent": memory}, "checks": []}
        return [DeviceReport(f"dev-{i:03d}", now, outcome, version, health)]
    if kind == "online":
        return [DeviceOnline(f"dev-{spec[1]:03d}", spec[2], now)]
    if kind == "join":
        return [DeviceJoined(_device(spec[1], spec[2]), now)]
    if kind == "flap":  # a device assigned lately goes offline or comes back
        return [DeviceOnline(assigned[-spec[1]].device, spec[2], now)] if len(assigned) >= spec[1] else []
    if kind == "tick":
        return [Tick(now)]
    if kind == "answer":  # every device assigned so far answers that it applied what it got
        return [DeviceReport(a.device, now, "applied", a.version) for a in assigned[-8:]]
    action = spec[1]
    cls = {"pause": Pause, "resume": Resume, "abort": Abort, "rollback": Rollback}.get(action)
    if cls is not None:
        return [cls(actor="op", reason=action, now=now)]
    return [Promote(actor="op", reason=action, now=now)]


def _view(state: RolloutState) -> dict[str, Any]:
    data = state.to_dict()
    data["devices"] = dict(sorted(data["devices"].items()))
    return data


def _recount(state: RolloutState) -> list[dict[str, int]]:
    counts: list[dict[str, int]] = [{} for _ in state.plan.waves]
    for s in state.devices.values():
        counts[s.wave][s.state] = counts[s.wave].get(s.state, 0) + 1
    return counts


def _run_both(raw: dict[str, Any], fleet: int, offline: set[int], script: list[tuple[Any, ...]],
              reload_at: int) -> RolloutState:
    """Run ``script`` through the incremental and the naive engine, comparing after every step."""
    plan = parse_plan(raw, source="rollouts/p.yaml")
    devices = [_device(i, i not in offline) for i in range(fleet)]
    start = new_rollout("r1", plan, release=NEW, previous=OLD, devices=devices, now=T0)
    fast, slow = start, start
    now = T0
    assigned: list[AssignRelease] = []

    def both(event: Event) -> None:
        nonlocal fast, slow
        fast, fast_effects = step(fast, event)
        slow, slow_effects = step_using(slow, event, NaiveDerived)
        assert _view(fast) == _view(slow)
        assert fast_effects == slow_effects
        assert wave_counts(fast) == _recount(fast)
        assigned.extend(e for e in fast_effects if isinstance(e, AssignRelease))

    both(Start(now=now, actor="op"))
    for n, spec in enumerate(script):
        now += spec[1] if spec[0] == "tick" else 0.25
        if n == reload_at:  # a restart: the state comes back from storage and rebuilds its index
            fast = RolloutState.from_dict(fast.to_dict())
        for event in _event(spec, now, assigned):
            if spec[0] == "op":
                assert check_action(fast, event) == check_action(slow, event)
            both(event)
    return fast


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_plans(), fleet=st.integers(1, 40), offline=st.sets(st.integers(0, 39), max_size=8),
       script=_events, reload_at=st.integers(0, 80))
def test_incremental_engine_decides_like_a_naive_recomputation(
        raw: dict[str, Any], fleet: int, offline: set[int], script: list[tuple[Any, ...]],
        reload_at: int) -> None:
    _run_both(raw, fleet, offline, script, reload_at)


def test_a_rollback_waits_for_a_device_that_went_offline_like_the_naive_engine() -> None:
    raw = {"waves": [{"soak": 0, "timeout": 90, "promotion": "manual"}, {"percent": 100, "soak": 0}]}
    script = [("answer",), ("op", "rollback"), ("flap", 1, False), ("tick", 5.0), ("tick", 5.0),
              ("flap", 1, True), ("answer",), ("tick", 100.0)]
    final = _run_both(raw, 11, set(), script, 99)  # one canary: dev-000 alone in the first wave
    assert final.phase == "rolled_back"


def test_an_operator_action_judged_once_decides_like_check_then_step() -> None:
    raw = {"waves": [{"soak": 0, "timeout": 60}, {"percent": 100, "soak": 0, "promotion": "manual"}]}
    plan = parse_plan(raw, source="rollouts/p.yaml")
    fleet = [_device(i) for i in range(12)]
    state = new_rollout("r1", plan, release=NEW, previous=OLD, devices=fleet, now=T0)
    state, _ = step(state, Start(now=T0, actor="op"))
    refused = Resume(actor="op", reason="", now=T0 + 1)
    assert judge_action(state, refused) == (check_action(state, refused), state, [])
    pause = Pause(actor="op", reason="x", now=T0 + 2)
    refusal, paused, effects = judge_action(state, pause)
    assert refusal is None
    assert (paused, effects) == step(state, pause)
    assert paused.phase == "paused"


def test_device_map_updates_share_and_never_change_the_original() -> None:
    base: DeviceMap[int] = DeviceMap({f"d{i}": i for i in range(300)})
    one = base.evolve({"d5": -5, "new-a": 1})
    two = base.evolve({"new-b": 2})  # a branch from the same map
    assert base["d5"] == 5
    assert "new-a" not in base
    assert len(base) == 300
    assert one["d5"] == -5
    assert list(one)[-1] == "new-a"
    assert len(one) == 301
    assert list(two)[-1] == "new-b"
    assert "new-a" not in two
    assert one == {**{f"d{i}": i for i in range(300)}, "d5": -5, "new-a": 1}
    grown = base
    for i in range(5000):  # outgrows its buckets: rebuilt, still equal to a dict
        grown = grown.evolve({f"g{i}": i})
    assert dict(grown) == {**dict(base), **{f"g{i}": i for i in range(5000)}}


def test_joins_place_devices_like_the_full_scan() -> None:
    plan = parse_plan({"waves": [{"percent": 5, "soak": 0}, {"percent": 30, "soak": 0},
                                 {"percent": 100, "soak": 0}]},
                      source="rollouts/p.yaml")
    fleet = [_device(i) for i in range(30)]
    state = new_rollout("r1", plan, release=NEW, previous=OLD, devices=fleet, now=T0)
    for i in range(30, 90):
        placed = {d: s.wave for d, s in state.devices.items()}
        expected = wave_of_new_device(plan, _device(i), "r1", placed)
        state, _ = step(state, DeviceJoined(_device(i), T0 + i))
        got = state.devices.get(_device(i).id)
        assert (got.wave if got is not None else NOT_TARGETED) == expected
