"""The fleet baseline on the server: which rollout phases move it, and that it survives a restart
of the fleet server (stored, then published again retained) with a real store and a real broker."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from edge_core import messages as m
from fleet_server.baseline import FleetBaseline, log_phase_errors
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.rollouts.plan import parse_plan
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import open_store
from tests.support.broker import Mosquitto, Subscriber

pytestmark = pytest.mark.timeout(60)

C1, C2, C3 = ("1" * 40, "2" * 40, "3" * 40)
TOPIC = "fleet/v1/_broadcast/baseline"


class Server:
    def __init__(self, tmp: Path, port: int, store: StoreConfig) -> None:
        config = parse_server_config({"mqtt": {"port": port, "client_id": "fleet-server-baseline"}}, tmp)
        self.store = open_store(store)
        self.ingestor = Ingestor(config, self.store, ServerMetrics().ingest)
        self.ingestor.start()
        assert self.ingestor.wait_connected(10.0)
        self.baseline = FleetBaseline(self.store, self.ingestor.publish_baseline)
        self.baseline.start()
        self.runner = RolloutRunner(self.store, self.ingestor.publish_desired)
        self.runner.set_phase_listener(log_phase_errors(self.baseline))

    def stop(self) -> None:
        self.ingestor.stop()
        self.store.close()


def _baselines(sub: Subscriber) -> list[tuple[str, int]]:
    out = []
    for r in sub.messages(TOPIC):
        if r.payload:
            msg = m.decode(m.BASELINE_KIND, r.payload, topic_device=None)
            out.append((msg["revision"], msg["release"]))
    return out


def test_phases_move_the_baseline_and_a_restart_publishes_it_again(tmp_path: Path,
                                                                    store_config: StoreConfig) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        server = Server(tmp_path, broker.port, store_config)
        try:
            for version, commit in ((1, C1), (2, C2), (3, C3)):
                server.store.record_release(version, commit, ["op"], time.time())
            # nothing stored yet: seeded from the newest release no rollout governs
            assert server.baseline.start() == (3, C3)
            plan = parse_plan({"waves": [{"percent": 100, "soak": 0}]}, source="t.yaml")
            first = server.runner.start(1, plan, actor="test", reason="release 1")
            server.runner.tick()
            assert server.runner.state(first).phase == "succeeded"  # type: ignore[union-attr]
            assert server.baseline.current() == (1, C1)
            rid = server.runner.start(2, plan, actor="test", reason="release 2")
            server.runner.tick()
            assert server.runner.state(rid).phase == "succeeded"  # type: ignore[union-attr]
            assert server.baseline.current() == (2, C2)           # a success moves it
            assert server.runner.act(rid, "rollback", actor="test", reason="bad after all") is None
            server.runner.tick()
            assert server.baseline.current() == (1, C1)           # a rollback of it moves it back
            audit = [a for a in server.store.audit(50) if a["action"] == "baseline.move"]
            assert [a["detail"]["release"] for a in audit][:2] == [1, 2]
        finally:
            server.stop()
        # the broker lost its retained baseline; a restarted server publishes the stored one again
        cleared = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", TOPIC,
                                  "-n", "-r", "-q", "1"], capture_output=True, timeout=10, check=False)
        assert cleared.returncode == 0, cleared.stderr
        with Subscriber(broker.port, [TOPIC], client_id="check-cleared") as empty:
            empty.wait_subscribed(1)
            time.sleep(0.5)
            assert _baselines(empty) == []
        server = Server(tmp_path, broker.port, store_config)
        try:
            with Subscriber(broker.port, [TOPIC], client_id="late-device") as sub:
                sub.wait_subscribed(1)
                assert sub.wait(lambda s: bool(_baselines(s)))
                assert _baselines(sub) == [(C1, 1)]
                assert all(r.retained for r in sub.messages(TOPIC))
        finally:
            server.stop()
