"""A release under rollout reaches a device only through its wave (the fleet baseline), end to end.

Real agents (the edge-agent daemon in threads, polling the mirror every two seconds), a real
``git daemon`` mirror, a real Mosquitto, and the fleet server's store, ingest, rollout runner, Git
watcher, rollout plans and fleet baseline wired as ``fleet-server`` wires them. Release 1 declares no
rollout (the baseline moves to it); release 2 declares ``rollout: {plan: waves}`` and its health
check fails on the canary. Before the baseline, the watcher nudged first and every unassigned device
took release 2 from the branch head at once, long before the canary wave ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from edge_agent.config import load_config
from edge_agent.state import StateDB
from edge_core.trust.keys import format_verify_key
from fleet_server.baseline import FleetBaseline, log_phase_errors
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.main import GitPlans
from fleet_server.metrics import ServerMetrics
from fleet_server.releases import GitWatcher
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import open_store
from tests.support.agent_fleet import AgentFleet
from tests.support.broker import Mosquitto, Subscriber
from tests.support.mirror import GitDaemon
from tests.support.rollout_agents import Agent, release_files

pytestmark = pytest.mark.timeout(180)

CANARY = "dev-0"


def waves_plan(on_failure: str) -> str:
    return yaml.safe_dump({"waves": [
        {"name": "canary", "soak": 3, "timeout": 30, "on_failure": on_failure},
        {"name": "rest", "percent": 100, "soak": 0},
    ]}, sort_keys=False)


class Server:
    """What ``fleet-server`` runs for releases and rollouts: store, ingest, baseline, runner, watcher."""

    def __init__(self, tmp: Path, port: int, repo: AgentFleet, store: StoreConfig) -> None:
        config = parse_server_config({
            "mqtt": {"port": port, "client_id": "fleet-server-canary"},
            "store": {"path": str(tmp / "fleet.db")},
            "git": {"url": repo.daemon.url("fleet.git"), "poll_interval": "1h", "cache_dir": str(tmp / "git"),
                    "trust": {"keys": [format_verify_key(repo.key.verify_key)]}},
        }, tmp)
        self.store = open_store(store)
        self.ingestor = Ingestor(config, self.store, ServerMetrics().ingest)
        self.ingestor.start()
        assert self.ingestor.wait_connected(10.0)
        self.baseline = FleetBaseline(self.store, self.ingestor.publish_baseline)
        self.baseline.start()
        self.runner = RolloutRunner(self.store, self.ingestor.publish_desired, tick_interval=0.2)
        self.runner.set_phase_listener(log_phase_errors(self.baseline))
        self.runner.start_thread()
        self.plans = GitPlans(config, self.store, self.runner, self.ingestor.publish_nudge, self.baseline)
        self.runner.set_plan_loader(self.plans.named)
        self.watcher = GitWatcher(config, self.store, self.plans.on_release)

    def stop(self) -> None:
        self.watcher.stop()
        self.plans.close()
        self.runner.stop()
        self.ingestor.stop()
        self.store.close()


class World:
    def __init__(self, tmp: Path, repo: AgentFleet, broker: Mosquitto, store: StoreConfig) -> None:
        self.tmp = tmp
        self.repo = repo
        self.broker = broker
        self.server = Server(tmp, broker.port, repo, store)
        self.agents: dict[str, Agent] = {}

    def agent(self, device_id: str, labels: dict[str, str], *, register: bool = True) -> Agent:
        agent = Agent(self.tmp / "devices", device_id, labels, self.repo, self.broker.port)
        data = yaml.safe_load((agent.dir / "agent.yaml").read_text())
        data["intervals"]["poll"] = "2s"  # devices look at the branch head on their own, often
        (agent.dir / "agent.yaml").write_text(yaml.safe_dump(data))
        agent.config = load_config(agent.dir / "agent.yaml")
        if register:
            self.server.store.register_device(device_id, labels=agent.labels, profile="test-device")
        self.agents[device_id] = agent
        return agent

    def publish(self, version: int, *, rollout: str | None = None,
                failing: dict[str, str] | None = None) -> str:
        files: dict[str, str | bytes] = dict(release_files(version, failing))
        if rollout is not None:
            files["fleet.yaml"] = "description: governed\nrollout: {plan: waves}\n"
            files["rollouts/waves.yaml"] = rollout
        sha = self.repo.publish(files)
        assert self.repo.version == version
        outcome = self.server.watcher.poll_once()
        assert (outcome.status, outcome.release) == ("new", version), outcome
        return sha

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 60.0,
             watch: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if watch is not None:
                watch()
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}: " + ", ".join(
            f"{a.id}={a.release()}" for a in self.agents.values()))

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.server.stop()


def applied_releases(agent: Agent) -> set[int]:
    """Every release this device ever applied, from its own event history."""
    db = StateDB(agent.config.state_dir / "state.db")
    try:
        return {int(e.detail["release"]) for e in db.recent_events(10_000)
                if e.kind == "sync_applied" and isinstance(e.detail.get("release"), int)}
    finally:
        db.close()


@pytest.fixture
def world(tmp_path: Path, store_config: StoreConfig) -> Iterator[World]:
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    with GitDaemon(mirrors) as daemon, Mosquitto(tmp_path / "broker") as broker:
        (tmp_path / "operator").mkdir()
        w = World(tmp_path, AgentFleet(tmp_path / "operator", daemon, mirrors), broker, store_config)
        try:
            yield w
        finally:
            w.stop()


def _start_on_release_one(world: World) -> dict[str, str]:
    commits = {"1": world.publish(1)}
    assert world.server.baseline.current() == (1, commits["1"])
    for i in range(6):
        world.agent(f"dev-{i}", {"canary": "true"} if i == 0 else {}).start()
    world.wait(lambda: all(a.release() == 1 for a in world.agents.values()), "every device on release 1")
    return commits


def test_a_broken_governed_release_never_reaches_a_non_canary_device(world: World) -> None:
    _start_on_release_one(world)
    with Subscriber(world.broker.port, ["fleet/v1/_broadcast/#"], client_id="watcher") as bus:
        bus.wait_subscribed(1)
        world.publish(2, rollout=waves_plan("rollback"), failing={"canary": "true"})
        rids = [r["id"] for r in world.server.runner.summaries()]
        assert len(rids) == 1
        rid = rids[0]

        def no_leak() -> None:
            for device, agent in world.agents.items():
                assert device == CANARY or agent.release() != 2, f"{device} took release 2 outside its wave"

        world.wait(lambda: (s := world.server.runner.state(rid)) is not None and s.phase == "rolled_back",
                   "the automatic rollback", 90, watch=no_leak)
        # a governed release is not nudged; the retained baseline still names release 1
        assert not any(r.topic.endswith("/nudge") for r in bus.messages())
    assert world.server.baseline.current() is not None
    assert world.server.baseline.current()[0] == 1  # type: ignore[index]
    world.wait(lambda: all(a.release() == 1 for a in world.agents.values()), "every device on release 1")
    for device, agent in world.agents.items():
        if device != CANARY:
            assert applied_releases(agent) == {1}, device
    # a device enrolled after the rollback gets the last-good release, not the head
    late = world.agent("dev-late", {})
    late.start()
    world.wait(lambda: late.release() == 1, "the late device on release 1")
    time.sleep(3)  # more than one poll of the branch head, which names release 2
    assert late.release() == 1
    assert applied_releases(late) == {1}


def test_a_device_started_while_the_rollout_is_halted_gets_the_last_good_release(world: World) -> None:
    _start_on_release_one(world)
    world.publish(2, rollout=waves_plan("halt"), failing={"canary": "true"})
    rid = world.server.runner.summaries()[0]["id"]
    world.wait(lambda: (s := world.server.runner.state(rid)) is not None and s.phase == "halted",
               "the halt", 90)
    fresh = world.agent("dev-new", {}, register=False)  # never seen by the server: not in the rollout
    fresh.start()
    world.wait(lambda: fresh.release() == 1, "the new device on release 1")
    time.sleep(3)  # more than one poll of the branch head, which names release 2
    assert fresh.release() == 1
    assert applied_releases(fresh) == {1}
    for device, agent in world.agents.items():
        assert device == CANARY or agent.release() == 1, device
    state = world.server.runner.state(rid)
    assert state is not None
    assert state.phase == "halted"
    assert world.server.baseline.current() is not None
    assert world.server.baseline.current()[0] == 1  # type: ignore[index]
