"""Two real ``fleet-server`` processes on one real PostgreSQL and one real Mosquitto: exactly one
leads; SIGKILL the leader and the other leads within the lease; SIGSTOP the leader longer than the
lease and the other takes over, and the paused one, continued, follows. Processes stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Mosquitto
from tests.support.mirror import free_port
from tests.support.postgres import Postgres
from tests.support.procs import Proc
from tests.support.wait import wait_until

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


@pytest.fixture
def cluster(tmp_path: Path, postgres_cluster: Postgres) -> Iterator[tuple[list[Proc], list[int]]]:
    url = postgres_cluster.create_database()
    procs: list[Proc] = []
    ports: list[int] = []
    (tmp_path / "broker").mkdir()
    with Mosquitto(tmp_path / "broker") as broker:
        try:
            for name in ("a", "b"):
                port = free_port()
                procs.append(Proc([sys.executable, "-m", "fleet_server.main", "--mqtt-port", str(broker.port),
                                   "--http-port", str(port), "--set", f"store.url={url}",
                                   "--set", f"store.password_file={postgres_cluster.password_file}",
                                   "--set", f"leader.lease={_LEASE}", "--set", f"mqtt.client_id=fleet-{name}",
                                   "--set", "mqtt.share_group=fleet"], tmp_path / f"server-{name}.log"))
                ports.append(port)
                wait_until(lambda p=port: _health(p) is not None, f"server {name} answers", timeout=60.0)
            yield procs, ports
        finally:
            for proc in procs:
                if proc.p.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                proc.stop()


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
