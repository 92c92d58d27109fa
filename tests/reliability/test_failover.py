"""Two real ``fleet-server`` processes on one real PostgreSQL and one real Mosquitto: exactly one
leads; SIGKILL the leader and the other leads within the lease; SIGSTOP the leader longer than the
lease and the other takes over, and the paused one, continued, follows. With simulated devices and
reports: the leader SIGKILLed in the middle of a rollout, a follower SIGKILLed during ingest, and
PostgreSQL restarted under ingest. Processes stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.bench_rollout import SimFleet
from edge_core import messages as m
from fleet_server import fleetctl
from fleet_server.config import StoreConfig
from fleet_server.store import open_store
from tests.support.broker import Mosquitto
from tests.support.mirror import free_port
from tests.support.postgres import Postgres
from tests.support.procs import Proc
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

_LEASE = 1.0


def _health(port: int) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2.0) as answer:
            doc = json.loads(answer.read())
            return doc if isinstance(doc, dict) else None
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _role(port: int) -> object:
    doc = _health(port)
    return None if doc is None else doc.get("role")


@dataclass
class Cluster:
    """Two replicas (``procs[i]`` serves HTTP on ``ports[i]``) on one database and one broker."""

    procs: list[Proc]
    ports: list[int]
    broker: Mosquitto
    store: StoreConfig
    token_file: Path
    argv: list[list[str]]

    def restart(self, i: int) -> None:
        """Start replica ``i`` again, as its service manager would, and wait until it answers."""
        log = self.procs[i].log
        self.procs[i].stop()
        self.procs[i] = Proc(self.argv[i], log.with_suffix(".again.log"))
        wait_until(lambda: _health(self.ports[i]) is not None, "the restarted replica answers", timeout=60.0)

    def leader(self) -> int:
        wait_until(lambda: sorted(str(_role(p)) for p in self.ports) == ["follower", "leader"], "one leader")
        return 0 if _role(self.ports[0]) == "leader" else 1


@contextmanager
def running_cluster(tmp_path: Path, pg: Postgres, *settings: str) -> Iterator[Cluster]:
    """Two replicas (``--set`` each of ``settings`` too) on a new database of ``pg`` and a new broker."""
    url = pg.create_database()
    token_file = tmp_path / "admin.token"
    token_file.write_text("failover-admin-token\n")
    token_file.chmod(0o600)
    procs: list[Proc] = []
    ports: list[int] = []
    argvs: list[list[str]] = []
    (tmp_path / "broker").mkdir()
    with Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000"]) as broker:
        try:
            for name in ("a", "b"):
                port = free_port()
                argvs.append([sys.executable, "-m", "fleet_server.main", "--mqtt-port", str(broker.port),
                              "--http-port", str(port), "--set", f"store.url={url}",
                              "--set", f"store.password_file={pg.password_file}",
                              "--set", f"leader.lease={_LEASE}", "--set", f"mqtt.client_id=fleet-{name}",
                              "--set", "mqtt.share_group=fleet",
                              "--set", f"http.admin_token_file={token_file}",
                              *(x for setting in settings for x in ("--set", setting))])
                procs.append(Proc(argvs[-1], tmp_path / f"server-{name}.log"))
                ports.append(port)
                wait_until(lambda p=port: _health(p) is not None, f"server {name} answers", timeout=60.0)
            store = StoreConfig(url=url, password_file=pg.password_file)
            yield Cluster(procs, ports, broker, store, token_file, argvs)
        finally:
            for proc in procs:
                if proc.p.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                proc.stop()


@pytest.fixture
def cluster_of(tmp_path: Path, postgres_cluster: Postgres) -> Iterator[Cluster]:
    with running_cluster(tmp_path, postgres_cluster) as c:
        yield c


@pytest.fixture
def cluster(cluster_of: Cluster) -> tuple[list[Proc], list[int]]:
    return cluster_of.procs, cluster_of.ports


def test_sigkill_of_the_leader_makes_the_other_replica_lead_within_the_lease(
        cluster: tuple[list[Proc], list[int]]) -> None:
    procs, ports = cluster
    wait_until(lambda: sorted(str(_role(p)) for p in ports) == ["follower", "leader"], "one leader")
    leader = 0 if _role(ports[0]) == "leader" else 1
    other = 1 - leader
    assert _health(ports[other]) is not None
    assert _health(ports[other])["store"] == "postgresql"  # type: ignore[index]
    os.kill(procs[leader].pid, signal.SIGKILL)
    procs[leader].wait(timeout=10)
    wait_until(lambda: _role(ports[other]) == "leader", "the surviving replica leads", timeout=15.0)


def test_a_leader_paused_longer_than_the_lease_is_replaced_and_follows_when_continued(
        cluster: tuple[list[Proc], list[int]]) -> None:
    procs, ports = cluster
    wait_until(lambda: sorted(str(_role(p)) for p in ports) == ["follower", "leader"], "one leader")
    leader = 0 if _role(ports[0]) == "leader" else 1
    other = 1 - leader
    os.kill(procs[leader].pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _role(ports[other]) == "leader", "the other replica takes over", timeout=20.0)
    finally:
        os.kill(procs[leader].pid, signal.SIGCONT)
    wait_until(lambda: _role(ports[leader]) == "follower", "the continued old leader follows", timeout=20.0)
    assert _role(ports[other]) == "leader"
    log = procs[leader].log.read_text(errors="replace")
    assert "leadership lost" in log


OLD, NEW = (1, "1" * 40), (2, "2" * 40)
_PLAN = {"waves": [{"name": "canary", "soak": 4, "timeout": 120},
                   {"name": "half", "percent": 50, "soak": 4, "timeout": 120},
                   {"name": "rest", "percent": 100, "soak": 0, "timeout": 120}]}


def _post(port: int, path: str, body: dict[str, object], token_file: Path) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10.0) as answer:
        doc = json.loads(answer.read())
    assert isinstance(doc, dict)
    return doc


def _phase(port: int, rid: str) -> object:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rollouts/{rid}", timeout=2.0) as answer:
            return json.loads(answer.read()).get("phase")
    except (OSError, urllib.error.URLError, ValueError):
        return None


def test_sigkill_of_the_leader_mid_rollout_ends_it_the_same_through_the_other_replica(
        cluster_of: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    c = cluster_of
    devices = {f"dev-{i:02d}": ({"canary": "true"} if i < 3 else {}) for i in range(12)}
    fleet = SimFleet(c.broker.port, devices, initial=OLD, client_id="sim-failover")
    fleet.start()
    store = open_store(c.store)
    try:
        for device, labels in devices.items():
            store.register_device(device, labels=labels)
        for version, commit in (OLD, NEW):
            store.record_release(version, commit, ["test"], time.time())
        wait_until(lambda: len([d for d in store.devices() if d["online"] and d["release"] == OLD[0]]) == 12,
                   "every simulated device is registered online on the old release", timeout=30.0)
        leader = c.leader()
        other = 1 - leader
        started = _post(c.ports[leader], "/api/v1/rollouts", {"release": NEW[0], "plan": _PLAN,
                                                              "reason": "failover"}, c.token_file)
        rid = str(started["id"])
        wait_until(lambda: any(a["action"] == "rollout.wave_started" and a["detail"].get("wave") == 1
                               for a in store.rollout_audit(rid)), "the second wave starts", timeout=60.0)
        os.kill(c.procs[leader].pid, signal.SIGKILL)  # mid-rollout: the half wave is being assigned
        c.procs[leader].wait(timeout=10)
        wait_until(lambda: _role(c.ports[other]) == "leader", "the surviving replica leads", timeout=15.0)
        # its service manager starts it again: the reports the broker had queued in its session (the
        # broker keeps giving a dead member of a share group its share) are stored then
        c.restart(leader)
        capsys.readouterr()
        code = fleetctl.main(["rollout", "watch", rid, "--server", f"http://127.0.0.1:{c.ports[other]}",
                              "--timeout", "90", "--interval", "0.5"])
        out, _ = capsys.readouterr()
        assert code == 0, out
        assert "succeeded" in out
        assert _phase(c.ports[other], rid) == "succeeded"
        # the same end as without the kill: every device on the new release, never another one
        assert set(fleet.running.values()) == {NEW}
        assert all(got and set(got) == {NEW[0]} for got in fleet.received.values()), fleet.received
        # no device was assigned before its wave started
        starts = {a["detail"]["wave"]: a["at"] for a in store.rollout_audit(rid)
                  if a["action"] == "rollout.wave_started"}
        assert sorted(starts) == [0, 1, 2]
        rows = store.rollout_device_rows(rid)
        assert len(rows) == 12
        for device, row in rows.items():
            assert row["assigned_at"] >= starts[row["wave"]], (device, row)
    finally:
        fleet.stop()
        store.close()


def test_sigkill_of_a_follower_during_ingest_loses_no_acknowledged_report_and_stores_each_once(
        cluster_of: Cluster) -> None:
    c = cluster_of
    follower = 1 - c.leader()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="reports", protocol=mqtt.MQTTv5)
    publisher.max_inflight_messages_set(100)
    publisher.connect("127.0.0.1", c.broker.port)
    publisher.loop_start()
    store = open_store(c.store)
    devices, per_device = 5, 120
    try:
        for i in range(per_device):
            if i == per_device // 3:
                os.kill(c.procs[follower].pid, signal.SIGKILL)  # with reports in flight to it
            for d in range(devices):
                msg = m.health_message(f"dev-{d}", commit=None, release=1, ts=1.7e9 + i,
                                       metrics={"cpu": float(i)}, checks=[])
                info = publisher.publish(m.topic("fleet/v1", f"dev-{d}", "health"), m.encode(msg), qos=1)
                info.wait_for_publish(5)
                assert info.is_published()  # acknowledged by the broker
        c.procs[follower].wait(timeout=10)
        c.restart(follower)  # its session kept what the broker had sent it and not had acknowledged

        def stored() -> list[int]:
            return [len(store.device_health(f"dev-{d}", limit=10 * per_device)) for d in range(devices)]

        wait_until(lambda: stored() == [per_device] * devices, "every acknowledged report is stored",
                   timeout=60.0)
        for d in range(devices):  # each report once: its own time, no other
            times = sorted(h["ts"] for h in store.device_health(f"dev-{d}", limit=10 * per_device))
            assert times == [1.7e9 + i for i in range(per_device)]
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        store.close()


def _send_health(publisher: mqtt.Client, devices: int, first: int, count: int) -> None:
    """Publish ``count`` health reports per device (times ``first`` onwards), each acknowledged."""
    for i in range(first, first + count):
        for d in range(devices):
            msg = m.health_message(f"dev-{d}", commit=None, release=1, ts=1.7e9 + i, metrics={"cpu": 1.0},
                                   checks=[])
            info = publisher.publish(m.topic("fleet/v1", f"dev-{d}", "health"), m.encode(msg), qos=1)
            info.wait_for_publish(5)
            assert info.is_published()


def test_a_postgresql_restart_under_ingest_loses_nothing_and_healthz_says_degraded_meanwhile(
        tmp_path: Path) -> None:
    with Postgres() as pg, running_cluster(tmp_path, pg, "ingest.max_lag=1") as c:
        c.leader()
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="reports", protocol=mqtt.MQTTv5)
        publisher.connect("127.0.0.1", c.broker.port)
        publisher.loop_start()
        store = open_store(c.store)
        devices = 4
        try:
            _send_health(publisher, devices, 0, 20)
            wait_until(lambda: sum(len(store.device_health(f"dev-{d}")) for d in range(devices)) == 80,
                       "the first reports are stored")
            store.close()
            restart = threading.Thread(target=pg.restart, args=(6.0,))
            restart.start()
            time.sleep(0.5)  # the database is going down
            _send_health(publisher, devices, 20, 30)  # the broker takes them; nothing can commit them
            reasons: list[str] = []

            def degraded() -> bool:
                for port in c.ports:
                    doc = _health(port) or {}
                    if doc.get("status") == "degraded":
                        reasons.extend(str(r) for r in doc.get("reasons", []))  # type: ignore[attr-defined]
                        return True
                return False

            wait_until(degraded, "a replica says degraded while the database is down", timeout=10.0)
            restart.join(timeout=60)
            assert any("ingest lag" in r for r in reasons), reasons
            store = open_store(c.store)

            def stored() -> list[list[float]]:
                return [sorted(h["ts"] for h in store.device_health(f"dev-{d}")) for d in range(devices)]

            wait_until(lambda: stored() == [[1.7e9 + i for i in range(50)]] * devices,
                       "every report is stored once after the restart", timeout=60.0)
            wait_until(lambda: all((_health(p) or {}).get("status") == "ok" for p in c.ports),
                       "both replicas say ok again", timeout=30.0)
        finally:
            publisher.disconnect()
            publisher.loop_stop()
            store.close()
