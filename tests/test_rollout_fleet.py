"""Rollouts end to end: real agents (the edge-agent daemon, each in a thread with its own root, state
and MQTT link) syncing signed releases from a real ``git daemon`` mirror, a real Mosquitto, and the
fleet server's store (each backend), ingest and rollout runner ticking on the real clock.

Every device's root holds ``/etc/app/release`` with the release it runs, so assertions read the
devices themselves. Devices start pinned to release 1 by a first rollout (otherwise an agent with
no assignment follows the branch head).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.rollouts.plan import RolloutPlan, parse_plan
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import open_store
from tests.support.agent_fleet import AgentFleet
from tests.support.broker import Mosquitto
from tests.support.mirror import GitDaemon
from tests.support.rollout_agents import Agent, release_files
from tests.support.stores import store_section

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class FleetServer:
    """Store + Ingestor + RolloutRunner ticking in its thread (what fleet-server runs for rollouts)."""

    def __init__(self, tmp_path: Path, port: int, store: StoreConfig) -> None:
        config = parse_server_config({"mqtt": {"port": port, "client_id": "fleet-server-e2e"},
                                      "store": store_section(store)}, tmp_path)
        self.store = open_store(config.store)
        self.ingestor = Ingestor(config, self.store, ServerMetrics().ingest)
        self.ingestor.start()
        assert self.ingestor.wait_connected(10.0)
        self.runner = RolloutRunner(self.store, self.ingestor.publish_desired, tick_interval=0.2)
        self.runner.start_thread()

    def stop(self) -> None:
        self.runner.stop()
        self.ingestor.stop()
        self.store.close()

    def phase(self, rid: str) -> str:
        state = self.runner.state(rid)
        return state.phase if state is not None else "missing"


class World:
    """The mirror, the broker, the server and the agents of one test."""

    def __init__(self, tmp_path: Path, repo: AgentFleet, broker: Mosquitto, store: StoreConfig) -> None:
        self.tmp = tmp_path
        self.repo = repo
        self.broker = broker
        self.store_config = store
        self.server = FleetServer(tmp_path, broker.port, store)
        self.agents: dict[str, Agent] = {}
        self.commits: dict[int, str] = {}

    def add_agents(self, labels: dict[str, dict[str, str]]) -> None:
        for device_id, extra in labels.items():
            agent = Agent(self.tmp / "devices", device_id, extra, self.repo, self.broker.port)
            self.server.store.register_device(device_id, labels=agent.labels, profile="test-device")
            self.agents[device_id] = agent

    def publish(self, version: int, failing: dict[str, str] | None = None) -> None:
        files = release_files(version, failing)
        stale = ("bundles/bad/bundle.yaml",) if "bundles/bad/bundle.yaml" not in files and \
            (self.repo.work.path / "bundles" / "bad" / "bundle.yaml").exists() else ()
        sha = self.repo.publish(files, remove=stale)
        assert self.repo.version == version
        self.commits[version] = sha
        self.server.store.record_release(version, sha, ["operator"], time.time())

    def restart_server(self) -> None:
        self.server.stop()
        self.server = FleetServer(self.tmp, self.broker.port, self.store_config)

    def wait(self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}: " + ", ".join(
            f"{a.id}={a.release()}" for a in self.agents.values()))

    def wait_phase(self, rid: str, phase: str, timeout: float = 60.0) -> None:
        def states() -> str:
            state = self.server.runner.state(rid)
            if state is None:
                return ""
            return str({d: (s.state, s.target, s.version) for d, s in state.devices.items()})

        self.wait(lambda: self.server.phase(rid) == phase, timeout, f"rollout {rid} {phase} "
                  f"(is {self.server.phase(rid)} {states()})")

    def pin_release_one(self) -> None:
        """Publish release 1 and roll it out to everyone at once, so each device is assigned it."""
        self.publish(1)
        for agent in self.agents.values():
            agent.start()
        rid = self.server.runner.start(1, plan({"percent": 100, "soak": 0}, canary_first=False), actor="test",
                                       reason="pin release 1")
        self.wait_phase(rid, "succeeded")
        assert {a.release() for a in self.agents.values()} == {1}

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.server.stop()


def plan(*waves: dict[str, Any], **top: Any) -> RolloutPlan:
    return parse_plan({"waves": list(waves), **top}, source="test.yaml")


@pytest.fixture
def world(tmp_path: Path, store_config: StoreConfig) -> Iterator[World]:
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    with GitDaemon(mirrors) as daemon, \
            Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000"]) as broker:
        (tmp_path / "operator").mkdir()
        repo = AgentFleet(tmp_path / "operator", daemon, mirrors)
        w = World(tmp_path, repo, broker, store_config)
        try:
            yield w
        finally:
            w.stop()


def test_healthy_waves_with_approval_offline_device_and_server_restart(world: World) -> None:
    world.add_agents({f"dev-{i:02d}": ({"canary": "true"} if i < 3 else {}) for i in range(21)})
    world.pin_release_one()
    world.publish(2)
    p = plan({"name": "canary", "soak": 1, "timeout": 30, "promotion": "manual"},
             {"name": "half", "percent": 50, "soak": 1, "timeout": 4, "offline": "skipped"},
             {"name": "rest", "percent": 100, "soak": 1, "timeout": 4, "offline": "skipped"})
    rid = world.server.runner.start(2, p, actor="alice", reason="release 2")
    world.wait_phase(rid, "waiting_approval")
    time.sleep(1.5)  # approval is not given: nothing moves on its own
    state = world.server.runner.state(rid)
    assert state is not None
    assert state.phase == "waiting_approval"
    waves = {d: s.wave for d, s in state.devices.items()}
    assert {d for d, w in waves.items() if w == 0} == {"dev-00", "dev-01", "dev-02"}
    expected = {d: 2 if w == 0 else 1 for d, w in waves.items()}
    assert {d: world.agents[d].release() for d in world.agents} == expected
    offline = sorted(d for d, w in waves.items() if w == 2)[0]
    world.agents[offline].stop()  # its last report says offline
    world.wait(lambda: world.server.store.device(offline)["online"] is False, 20, f"{offline} offline")
    assert world.server.runner.act(rid, "promote", actor="bob", reason="canaries fine") is None
    world.wait(lambda: any(world.agents[d].release() == 2 for d, w in waves.items() if w == 1), 30,
               "wave 2 moving")
    world.restart_server()  # mid-wave: the rollout continues where it was
    world.wait_phase(rid, "succeeded", 90)
    for device, agent in world.agents.items():
        assert agent.release() == (1 if device == offline else 2), device
    final = world.server.runner.state(rid)
    assert final is not None
    assert final.devices[offline].state == "skipped"
    assert [g.wave for g in final.gates] == [0, 1, 2]
    assignments = {a["device"]: a for a in world.server.store.assignments()}
    assert all(a["published_at"] is not None for a in assignments.values())
    expected = {d: 1 if d == offline else 2 for d in world.agents}
    assert {d: a["release"] for d, a in assignments.items()} == expected
    world.agents[offline].start()  # back online: it converges to what its wave says
    world.wait(lambda: world.agents[offline].release() == 2, 30, f"{offline} converging")


def test_failing_canary_halts_and_rolls_back_its_wave(world: World) -> None:
    world.add_agents({f"dev-{i}": ({"canary": "true"} if i < 2 else {}) for i in range(8)})
    world.pin_release_one()
    world.publish(2, failing={"canary": "true"})
    p = plan({"name": "canary", "soak": 2, "timeout": 30, "on_failure": "rollback"},
             {"percent": 100, "soak": 0})
    rid = world.server.runner.start(2, p, actor="alice", reason="bad release")
    world.wait_phase(rid, "rolled_back")
    state = world.server.runner.state(rid)
    assert state is not None
    assert set(state.tripped) <= {"dev-0", "dev-1"}
    assert state.tripped
    assert {a.release() for a in world.agents.values()} == {1}
    assignments = {a["device"]: a for a in world.server.store.assignments()}
    for device in world.agents:
        assert assignments[device]["release"] == 1  # later waves never got release 2; canaries went back
    assert not (world.agents["dev-5"].root / "etc" / "app" / "bad").exists()
    done = [a for a in world.server.store.rollout_audit(rid) if a["action"] == "rollout.rolled_back"]
    assert done[0]["detail"]["unconfirmed"] == []  # every canary confirmed the previous release
    decisions = world.server.store.rollout_gates(rid)
    assert [(g["wave"], g["passed"]) for g in decisions] == [(0, False)]


def test_failures_under_the_threshold_continue_and_a_newer_release_supersedes(world: World) -> None:
    world.add_agents({f"dev-{i}": {"group": "a" if i < 4 else "b", **({"flaky": "true"} if i == 1 else {})}
                      for i in range(8)})
    world.pin_release_one()
    world.publish(2, failing={"flaky": "true"})
    p = plan({"selector": {"labels": {"group": "a"}}, "soak": 1, "timeout": 30, "max_failure_rate": 0.5,
              "min_reported": 2},
             {"percent": 100, "soak": 0, "promotion": "manual"}, canary_first=False)
    first = world.server.runner.start(2, p, actor="alice", reason="release 2")
    world.wait_phase(first, "running")
    world.wait(lambda: (s := world.server.runner.state(first)) is not None and s.wave == 1, 60,
               "wave 1 passing")
    state = world.server.runner.state(first)
    assert state is not None
    assert state.devices["dev-1"].state in ("rolled_back", "failed")
    assert state.gates[0].passed
    world.publish(3)
    second = world.server.runner.start(3, plan({"percent": 100, "soak": 0}, canary_first=False),
                                       actor="alice", reason="release 3 supersedes 2")
    assert world.server.phase(first) == "superseded"
    world.wait_phase(second, "succeeded")
    world.wait(lambda: {a.release() for a in world.agents.values()} == {3}, 30, "everyone on release 3")
    assert world.server.runner.act(first, "resume", actor="bob", reason="no") is not None
