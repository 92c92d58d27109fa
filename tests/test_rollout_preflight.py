"""A rollout's preflight against a real Mosquitto, the real Ingestor, rollout runner and preflight
duty, and a store on each backend. Devices are simulated by :class:`bench.bench_rollout.SimFleet`
(one paho client answering every ``preflight`` request with a ``plan`` report); the runner and the
duty are ticked by the test with a clock it moves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.bench_rollout import PreflightAnswer, SimFleet
from fleet_server.api import ApiActions, create_app
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.rollouts.plan import parse_plan, with_preflight
from fleet_server.rollouts.preflight import AUDIT_ACTION, PreflightDuty
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import FleetStore, open_store
from tests.support.api_server import serve_app
from tests.support.broker import Mosquitto

OLD, NEW = (1, "1" * 40), (2, "2" * 40)
PLAN = {"waves": [{"name": "canary", "soak": 0, "timeout": 600}, {"name": "rest", "percent": 100, "soak": 0}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    """Store, ingest, runner and preflight duty of one fleet server, and a simulated fleet."""

    def __init__(self, tmp: Path, broker: Mosquitto, store: StoreConfig, devices: int,
                 answer: PreflightAnswer | None = None) -> None:
        self.clock = Clock()
        config = parse_server_config({"mqtt": {"port": broker.port, "client_id": "fleet-server-preflight"}},
                                     tmp)
        self.store: FleetStore = open_store(store)
        self.ingestor = Ingestor(config, self.store, ServerMetrics().ingest)
        self.ingestor.start()
        assert self.ingestor.wait_connected(10.0)
        self.runner = RolloutRunner(self.store, self.ingestor.publish_desired, clock=self.clock)
        self.runner.load()
        self.notified: list[tuple[str, dict[str, Any], str | None]] = []
        self.duty = PreflightDuty(self.store, self.runner, self.ingestor.publish_preflight, clock=self.clock,
                                  notify=self._notify)
        labels = {f"dev-{i:02d}": ({"canary": "true"} if i < 2 else {}) for i in range(devices)}
        self.fleet = SimFleet(broker.port, labels, initial=OLD, client_id="sim-preflight", preflight=answer)
        self.fleet.start()
        for device, device_labels in labels.items():
            self.store.register_device(device, labels=device_labels)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
                d["release"] is not None and d["online"] for d in self.store.devices()):
            time.sleep(0.05)
        for version, commit in (OLD, NEW):
            self.store.record_release(version, commit, ["test"], time.time())

    def _notify(self, event: str, data: Any, *, key: str | None = None, at: float | None = None) -> int:
        self.notified.append((event, dict(data), key))
        return 1

    def drive(self, rid: str, until: Callable[[str], bool], *, step: float = 1.0) -> str:
        """Tick the runner and the duty (the clock moving ``step`` seconds a tick) until ``until(phase)``."""
        deadline = time.monotonic() + 20
        phase = ""
        while time.monotonic() < deadline:
            self.ingestor.drain(2.0)
            self.runner.tick()
            self.duty.tick()
            state = self.runner.state(rid)
            assert state is not None
            phase = state.phase
            if until(phase):
                return phase
            self.clock.now += step
            time.sleep(0.05)
        return phase

    def summary(self, rid: str) -> dict[str, Any]:
        rows = [a for a in self.store.rollout_audit(rid) if a["action"] == AUDIT_ACTION]
        assert rows, "no preflight summary"
        detail = rows[-1]["detail"]
        assert isinstance(detail, dict)
        return detail

    def preflight_state(self, rid: str) -> str | None:
        rows = [a for a in self.store.rollout_audit(rid) if a["action"] == AUDIT_ACTION]
        return str(rows[-1]["detail"]["state"]) if rows else None

    def stop(self) -> None:
        self.fleet.stop()
        self.ingestor.stop()
        self.store.close()


@pytest.fixture
def worlds(tmp_path: Path, broker: Mosquitto, store_config: StoreConfig) -> Iterator[Callable[..., World]]:
    made: list[World] = []

    def make(devices: int = 8, answer: PreflightAnswer | None = None) -> World:
        made.append(World(tmp_path, broker, store_config, devices, answer))
        return made[-1]

    yield make
    for w in made:
        w.stop()


def test_a_passing_preflight_starts_the_first_wave_and_the_api_shows_it(worlds: Callable[..., World]) -> None:
    w = worlds(8)
    rid = w.runner.start(NEW[0], parse_plan(PLAN, source="t.yaml"), actor="alice", reason="r", preflight=True)
    state = w.runner.state(rid)
    assert state is not None
    assert state.phase == "waiting_approval"  # nothing assigned before the preflight
    assert all(not got for got in w.fleet.received.values())
    assert w.drive(rid, lambda ph: ph == "succeeded") == "succeeded"
    summary = w.summary(rid)
    assert (summary["state"], summary["counts"]["change"], summary["counts"]["refused"]) == ("passed", 8, 0)
    assert all(w.fleet.preflights[d] == [rid] for d in w.fleet.preflights)
    approvals = [a for a in w.store.rollout_audit(rid) if a["action"] == "rollout.promote"]
    assert [a["actor"] for a in approvals] == ["preflight"]
    assert set(w.fleet.running.values()) == {NEW}
    app = create_app(w.store, parse_server_config({}, Path(".")), ServerMetrics(),
                     actions=ApiActions(rollouts=w.runner))
    with serve_app(app) as url:
        doc = httpx.get(f"{url}/api/v1/rollouts/{rid}/preflight", timeout=5.0).json()
        assert (doc["id"], doc["state"], doc["counts"]["change"]) == (rid, "passed", 8)
        assert httpx.get(f"{url}/api/v1/rollouts/nope-1/preflight", timeout=5.0).status_code in (400, 404)


def test_a_preflight_with_refusals_over_the_share_aborts_before_any_device_changes(
        worlds: Callable[..., World]) -> None:
    def answer(device: str, _release: int) -> tuple[str, str | None]:
        if device in ("dev-03", "dev-05", "dev-06"):
            return "refused", "drivers unavailable on this device: sysctl: not allowed by profile rpi4"
        return ("nochange", None) if device == "dev-07" else ("change", None)

    w = worlds(8, answer)
    plan = parse_plan({**PLAN, "preflight": {"max_refused": 0.25}}, source="t.yaml")
    rid = w.runner.start(NEW[0], plan, actor="alice", reason="r")  # the plan asks for it
    assert w.drive(rid, lambda ph: ph == "aborted") == "aborted"
    state = w.runner.state(rid)
    assert state is not None
    summary = w.summary(rid)
    assert summary["state"] == "failed"
    assert summary["counts"] == {"change": 4, "nochange": 1, "refused": 3, "waiting": 0, "offline": 0}
    [group] = summary["refusals"]
    assert (group["devices"], group["examples"]) == (3, ["dev-03", "dev-05", "dev-06"])
    assert "sysctl" in group["reason"]
    assert all(not got for got in w.fleet.received.values())  # no device was assigned
    assert set(w.fleet.running.values()) == {OLD}
    aborted = [a for a in w.store.rollout_audit(rid) if a["action"] == "rollout.abort"]
    assert aborted[0]["actor"] == "preflight"
    assert "3 of 8 device(s) would refuse" in aborted[0]["reason"]
    [(event, data, key)] = w.notified  # the verdict, notified once
    assert (event, data["rollout"], data["state"], key) == ("rollout.preflight", rid, "failed",
                                                            f"rollout.preflight:{rid}")


def test_offline_devices_do_not_block_a_preflight_and_approve_after_waits_for_an_operator(
        worlds: Callable[..., World]) -> None:
    w = worlds(6)
    w.fleet.set_online("dev-04", False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (w.store.device("dev-04") or {}).get("online"):
        time.sleep(0.05)
    plan = parse_plan({**PLAN, "preflight": {"approve_after": True}}, source="t.yaml")
    rid = w.runner.start(NEW[0], plan, actor="alice", reason="r")
    w.drive(rid, lambda _ph: w.preflight_state(rid) == "passed")  # once every online device answered
    summary = w.summary(rid)
    assert summary["state"] == "passed"
    assert (summary["counts"]["offline"], summary["offline"]) == (1, ["dev-04"])
    state = w.runner.state(rid)
    assert state is not None
    assert state.phase == "waiting_approval"  # an operator still approves the first wave
    assert w.runner.act(rid, "promote", actor="bob", reason="preflight looks fine", wave=0) is None
    assert w.drive(rid, lambda ph: ph in ("running", "succeeded")) in ("running", "succeeded")


def test_with_preflight_holds_the_first_wave_and_keeps_an_operators_approval() -> None:
    plain = with_preflight(parse_plan(PLAN, source="t.yaml"))
    assert plain.waves[0].pause_before
    assert plain.preflight is not None
    assert not plain.preflight.approve_after
    waves = [{"name": "c", "pause_before": True}, {"name": "r", "percent": 100}]
    gated = with_preflight(parse_plan({"waves": waves}, source="t.yaml"))
    assert gated.preflight is not None
    assert gated.preflight.approve_after
    rule = parse_plan({**PLAN, "preflight": {"max_refused": 0.1, "timeout": "2m"}}, source="t.yaml").preflight
    assert rule is not None
    assert (rule.max_refused, rule.timeout, rule.approve_after) == (0.1, 120, False)
