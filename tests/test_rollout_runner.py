"""The rollout runner against a real Mosquitto, the real Ingestor and a real SQLite store.

Devices are simulated by :class:`bench.bench_rollout.SimFleet`: one paho client answering every
retained ``desired`` message with the agent's own report messages. The runner is ticked by the test
with a clock the test moves, so soaks and timeouts take no wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from bench.bench_rollout import SimFleet
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.errors import PlanError, UsageError
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.rollouts.engine import DeviceReport
from fleet_server.rollouts.plan import RolloutPlan, parse_plan
from fleet_server.rollouts.runner import (
    RolloutRunner,
    plan_from_tree,
    progress_counts,
    report_from_event,
    report_from_health,
)
from fleet_server.store import open_store
from tests.support.broker import Mosquitto

OLD = (1, "1" * 40)
NEW = (2, "2" * 40)
NEWER = (3, "3" * 40)


class Clock:
    """The runner's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Server:
    """Store + Ingestor + RolloutRunner: the fleet server's rollout path, without HTTP."""

    def __init__(self, tmp_path: Path, port: int, clock: Clock, store: StoreConfig) -> None:
        config = parse_server_config({"mqtt": {"port": port, "client_id": "fleet-server-rollouts"}}, tmp_path)
        self.store = open_store(store)
        self.metrics = ServerMetrics()
        self.ingestor = Ingestor(config, self.store, self.metrics.ingest)
        self.ingestor.start()
        assert self.ingestor.wait_connected(10.0)
        self.runner = RolloutRunner(self.store, self.ingestor.publish_desired, clock=clock)
        self.runner.load()

    def stop(self) -> None:
        self.ingestor.stop()
        self.store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def servers(tmp_path: Path, broker: Mosquitto, clock: Clock,
            store_config: StoreConfig) -> Iterator[Callable[[], Server]]:
    started: list[Server] = []

    def make() -> Server:
        s = Server(tmp_path, broker.port, clock, store_config)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def fleets(broker: Mosquitto) -> Iterator[Callable[..., SimFleet]]:
    started: list[SimFleet] = []

    def make(devices: Mapping[str, Mapping[str, str]], **kwargs: Any) -> SimFleet:
        fleet = SimFleet(broker.port, devices, initial=OLD, client_id=f"sim-{len(started)}", **kwargs)
        fleet.start()
        started.append(fleet)
        return fleet

    yield make
    for f in started:
        f.stop()


def fleet_of(n: int, canaries: int = 3) -> dict[str, dict[str, str]]:
    return {f"dev-{i:02d}": ({"canary": "true"} if i < canaries else {}) for i in range(n)}


def plan(*waves: dict[str, Any], **top: Any) -> RolloutPlan:
    return parse_plan({"waves": list(waves), **top}, source="test.yaml")


def ready(server: Server, fleet: SimFleet, releases: tuple[tuple[int, str], ...] = (OLD, NEW)) -> None:
    """Register the simulated devices with their labels, wait until each reported its release, and
    record the releases."""
    for device, labels in fleet.labels.items():
        server.store.register_device(device, labels=labels)
    deadline = time.monotonic() + 15
    want = len(fleet.running)
    while time.monotonic() < deadline:
        devices = server.store.devices()
        if len(devices) >= want and all(d["release"] is not None and d["online"] for d in devices):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the simulated devices did not register")
    for version, commit in releases:
        server.store.record_release(version, commit, ["test"], time.time())


def drive(server: Server, rid: str, until: Callable[[str], bool], *, clock: Clock | None = None,
          step_seconds: float = 0.0, timeout: float = 20.0) -> str:
    """Tick the runner (moving the clock by ``step_seconds`` per tick) until ``until(phase)``; bounded."""
    deadline = time.monotonic() + timeout
    phase = ""
    for _ in range(2000):
        server.ingestor.drain(2.0)
        server.runner.tick()
        state = server.runner.state(rid)
        assert state is not None
        phase = state.phase
        if until(phase) or time.monotonic() > deadline:
            return phase
        if clock is not None:
            clock.now += step_seconds
        time.sleep(0.05)
    return phase


def waves_started(server: Server, rid: str) -> list[int]:
    return [a["detail"]["wave"] for a in server.store.rollout_audit(rid)
            if a["action"] == "rollout.wave_started"]


def test_three_waves_all_healthy_promote_in_order(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(24))
    ready(server, fleet)
    p = plan({"name": "canary", "soak": 30, "timeout": 300}, {"name": "half", "percent": 50, "soak": 30},
             {"name": "rest", "percent": 100, "soak": 30})
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    phase = drive(server, rid, lambda ph: ph == "succeeded", clock=clock, step_seconds=10)
    assert phase == "succeeded"
    assert waves_started(server, rid) == [0, 1, 2]
    gates = server.store.rollout_gates(rid)
    assert [(g["wave"], g["passed"]) for g in gates] == [(0, True), (1, True), (2, True)]
    assert set(fleet.running.values()) == {NEW}
    assert all(got == [NEW[0]] for got in fleet.received.values())
    state = server.runner.state(rid)
    assert state is not None
    assert {d.state for d in state.devices.values()} == {"applied"}
    assert [state.devices[f"dev-{i:02d}"].wave for i in range(3)] == [0, 0, 0]
    assert all(a["published_at"] is not None and a["release"] == NEW[0] for a in server.store.assignments())
    start = next(a for a in server.store.rollout_audit(rid) if a["action"] == "rollout.start")
    assert (start["actor"], start["reason"]) == ("alice", "test")
    samples = server.store.rollout_samples(rid)
    assert samples
    assert samples[-1]["done"] > 0


def test_pause_before_holds_the_gated_wave_until_an_operator_approves(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(12))
    ready(server, fleet)
    p = plan({"name": "canary", "soak": 0}, {"name": "half", "percent": 50, "soak": 0, "pause_before": True},
             {"name": "rest", "percent": 100, "soak": 0})
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    waiting = drive(server, rid, lambda ph: ph == "waiting_approval", clock=clock, step_seconds=5)
    assert waiting == "waiting_approval"
    for _ in range(10):  # more ticks and time change nothing
        clock.now += 600
        server.ingestor.drain(1.0)
        server.runner.tick()
    state = server.runner.state(rid)
    assert state is not None
    assert state.phase == "waiting_approval"
    gated = {d for d, s in state.devices.items() if s.wave == 1}
    assert gated
    assigned = {a["device"] for a in server.store.assignments()}
    assert assigned == {d for d, s in state.devices.items() if s.wave == 0}
    assert not gated & {d for d, got in fleet.received.items() if got}
    assert waves_started(server, rid) == [0]
    assert server.runner.act(rid, "promote", actor="bob", reason="canaries look fine") is None
    assert drive(server, rid, lambda ph: ph == "succeeded", clock=clock, step_seconds=5) == "succeeded"
    assert waves_started(server, rid) == [0, 1, 2]
    assert set(fleet.running.values()) == {NEW}


def test_failing_canary_halts_wave_one_and_rolls_it_back(servers, fleets, clock):
    server = servers()
    canaries = {f"dev-{i:02d}" for i in range(3)}
    fleet = fleets(fleet_of(20),
                   outcome=lambda d, r: "rolled_back" if d == "dev-01" and r == NEW[0] else "applied")
    ready(server, fleet)
    p = plan({"name": "canary", "soak": 30, "timeout": 300, "on_failure": "rollback"},
             {"percent": 50, "soak": 0}, {"percent": 100, "soak": 0})
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    phase = drive(server, rid, lambda ph: ph == "rolled_back", clock=clock, step_seconds=5)
    assert phase == "rolled_back"
    state = server.runner.state(rid)
    assert state is not None
    assert "dev-01" in state.tripped
    for device, got in fleet.received.items():
        if device in canaries:
            assert (got[0], got[-1]) == (NEW[0], OLD[0]), (device, got)
            assert fleet.running[device] == OLD
        else:
            assert got == [], (device, got)  # later waves never received the new release
    assert [g["passed"] for g in server.store.rollout_gates(rid)] == [False]


def test_failure_rate_under_the_threshold_continues(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(20, canaries=0), outcome=lambda d, r: "failed" if d == "dev-05" else "applied")
    ready(server, fleet)
    p = plan({"percent": 100, "soak": 10, "max_failure_rate": 0.2, "min_reported": 5}, canary_first=False)
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    assert drive(server, rid, lambda ph: ph == "succeeded", clock=clock, step_seconds=5) == "succeeded"
    state = server.runner.state(rid)
    assert state is not None
    assert state.devices["dev-05"].state == "failed"


def test_offline_device_times_out_and_converges_when_back(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(12))
    ready(server, fleet)
    fleet.set_online("dev-07", False)
    assert drive_registry(server, lambda: server.store.device("dev-07")["online"] is False)
    p = plan({"soak": 0, "timeout": 60}, {"percent": 100, "soak": 0, "timeout": 60, "offline": "skipped"})
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    phase = drive(server, rid, lambda ph: ph == "succeeded", clock=clock, step_seconds=20)
    assert phase == "succeeded"
    state = server.runner.state(rid)
    assert state is not None
    assert state.devices["dev-07"].state == "skipped"
    assert fleet.running["dev-07"] == OLD
    fleet.set_online("dev-07", True)
    for _ in range(200):
        server.ingestor.drain(2.0)
        server.runner.tick()
        if fleet.running["dev-07"] == NEW:
            break
        time.sleep(0.05)
    assert fleet.running["dev-07"] == NEW  # what its wave says


def drive_registry(server: Server, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.ingestor.drain(2.0)
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_manual_promotion_waits_for_promote(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(10))
    ready(server, fleet)
    p = plan({"soak": 0, "promotion": "manual"}, {"percent": 100, "soak": 0})
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    assert drive(server, rid, lambda ph: ph == "waiting_approval") == "waiting_approval"
    for _ in range(5):
        clock.now += 3600
        server.runner.tick()
    state = server.runner.state(rid)
    assert state is not None
    assert state.phase == "waiting_approval"
    assert sum(1 for got in fleet.received.values() if got) == 3
    assert server.runner.act(rid, "resume", actor="bob", reason="nothing paused") is not None
    assert server.runner.act(rid, "promote", actor="bob", reason="canaries look fine") is None
    assert drive(server, rid, lambda ph: ph == "succeeded") == "succeeded"
    promote = [a for a in server.store.rollout_audit(rid) if a["actor"] == "bob"]
    assert promote
    assert promote[0]["reason"] == "canaries look fine"


def test_restart_mid_wave_continues_without_a_wrong_assignment(tmp_path, servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(16))
    ready(server, fleet)
    p = plan({"soak": 60}, {"percent": 50, "soak": 60}, {"percent": 100, "soak": 0})
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    drive(server, rid, lambda ph: (s := server.runner.state(rid)) is not None and s.wave == 1, clock=clock,
          step_seconds=20)
    before = server.runner.state(rid)
    assert before is not None
    assert before.wave == 1
    assert before.phase == "running"
    server.stop()  # the whole server goes away mid-wave
    clock.now += 5
    again = servers()
    assert again.runner.load() == 1
    after = again.runner.state(rid)
    assert after is not None
    assert after.wave == 1
    assert after.devices == before.devices
    assert drive(again, rid, lambda ph: ph == "succeeded", clock=clock, step_seconds=20) == "succeeded"
    # the outbox publishes at least once: an assignment published just before the stop and not yet
    # marked published is published again, the same; never a different release
    assert all(got and set(got) == {NEW[0]} for got in fleet.received.values()), fleet.received
    assert set(fleet.running.values()) == {NEW}


def test_a_newer_release_supersedes_the_running_rollout(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(10))
    ready(server, fleet, (OLD, NEW, NEWER))
    p = plan({"soak": 0, "promotion": "manual"}, {"percent": 100, "soak": 0})
    first = server.runner.start(NEW[0], p, actor="alice", reason="v2")
    assert drive(server, first, lambda ph: ph == "waiting_approval") == "waiting_approval"
    second = server.runner.start(NEWER[0], plan({"soak": 0}, {"percent": 100, "soak": 0}), actor="alice",
                                 reason="v3")
    old = server.runner.state(first)
    assert old is not None
    assert old.phase == "superseded"
    assert old.superseded_by == second
    assert server.runner.act(first, "promote", actor="bob", reason="too late") is not None
    with pytest.raises(UsageError, match="not newer"):
        server.runner.start(NEW[0], p, actor="alice", reason="older")
    assert drive(server, second, lambda ph: ph == "succeeded") == "succeeded"
    assert set(fleet.running.values()) == {NEWER}
    new_state = server.runner.state(second)
    assert new_state is not None
    assert new_state.previous is not None


def test_a_succeeded_rollout_stays_succeeded_when_a_newer_one_supersedes_it(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(6))
    ready(server, fleet, (OLD, NEW, NEWER))
    first = server.runner.start(NEW[0], plan({"soak": 0}, {"percent": 100, "soak": 0}), actor="alice",
                                reason="v2")
    assert drive(server, first, lambda ph: ph == "succeeded") == "succeeded"
    second = server.runner.start(NEWER[0], plan({"soak": 0}, {"percent": 100, "soak": 0}), actor="alice",
                                 reason="v3")
    old = server.runner.state(first)
    assert old is not None
    assert (old.phase, old.superseded_by) == ("succeeded", second)
    described = server.runner.describe(first)
    assert described is not None
    assert (described["phase"], described["superseded_by"]) == ("succeeded", second)
    assert described["superseded_at"] is not None
    actions = [a["action"] for a in server.store.rollout_audit(first)]
    assert actions[-1] == "rollout.supersede"
    assert "rollout.succeed" in actions
    assert server.runner.act(first, "rollback", actor="bob", reason="too late") is not None
    assert drive(server, second, lambda ph: ph == "succeeded") == "succeeded"
    # a restart serves from the newest rollout, not the superseded one
    server.stop()
    again = servers()
    again.runner.load()
    assert [s.rollout_id for s in again.runner.live_states()] == [second]


def test_paused_device_shows_deferred_not_failed(servers, fleets, clock):
    server = servers()
    fleet = fleets(fleet_of(8, canaries=0))
    ready(server, fleet)
    fleet.set_paused("dev-03", True)
    assert drive_registry(server, lambda: server.store.device("dev-03")["paused"] is True)
    p = plan({"percent": 100, "soak": 0}, canary_first=False)
    rid = server.runner.start(NEW[0], p, actor="alice", reason="test")
    assert drive(server, rid, lambda ph: ph == "succeeded") == "succeeded"
    state = server.runner.state(rid)
    assert state is not None
    assert state.devices["dev-03"].state == "deferred"
    assert fleet.running["dev-03"] == OLD
    fleet.set_paused("dev-03", False)
    for _ in range(200):
        server.ingestor.drain(2.0)
        server.runner.tick()
        s = server.runner.state(rid)
        if s is not None and s.devices["dev-03"].state == "applied":
            break
        time.sleep(0.05)
    assert fleet.running["dev-03"] == NEW


def test_report_mapping() -> None:
    now = 5.0
    assert report_from_event({"device": "d", "type": "sync_succeeded", "release": 4}, now) == \
        DeviceReport(device="d", now=now, outcome="applied", release_version=4)
    assert report_from_event({"device": "d", "type": "sync_refused", "release": 4}, now).outcome == "refused"
    paused = report_from_event({"device": "d", "type": "paused", "release": 4}, now)
    assert paused is not None
    assert (paused.outcome, paused.release_version) == ("deferred", None)
    assert report_from_event({"device": "d", "type": "drift_detected", "release": 4}, now) is None
    bad = report_from_health({"device": "d", "release": 4, "metrics": {"memory_percent": 10},
                              "checks": [{"name": "web", "ok": False}]}, now)
    assert bad is not None
    assert bad.outcome == "health_failed"
    good = report_from_health({"device": "d", "release": 4, "metrics": {},
                               "checks": [{"name": "web", "ok": True}]}, now)
    assert good is not None
    assert good.outcome == "applied"
    assert good.health is not None
    assert report_from_health({"device": "d", "release": None, "metrics": {}, "checks": []}, now) is None
    assert progress_counts({"applied": 2, "refused": 1, "failed": 1, "assigned": 3, "offline": 1}) == \
        {"done": 2, "failed": 2, "pending": 3, "offline": 1, "deferred": 0, "skipped": 0}


def test_plan_from_tree() -> None:
    plan_text = b"waves:\n  - {percent: 100, soak: 0}\n"
    assert plan_from_tree({}) is None
    assert plan_from_tree({"fleet.yaml": b"description: x\n"}) is None
    named = plan_from_tree({"fleet.yaml": b"rollout: {plan: fast}\n", "rollouts/fast.yaml": plan_text})
    assert named is not None
    assert named.name == "fast"
    assert named.waves[0].soak == 0
    inline = plan_from_tree({"fleet.yaml": b"rollout:\n  waves:\n    - {percent: 100}\n"})
    assert inline is not None
    assert inline.waves[0].percent == 100
    with pytest.raises(UsageError):
        plan_from_tree({"fleet.yaml": b"rollout: {plan: missing}\n"})
    with pytest.raises(PlanError):
        plan_from_tree({"fleet.yaml": b"rollout: {plan: bad}\n", "rollouts/bad.yaml": b"waves: []\n"})
