"""``ingest.processes``: the MQTT receive path in ingest processes supervised by ``fleet-server``, on a
real Mosquitto and a real store on each backend: every acknowledged report stored exactly once with one
and two processes, a SIGKILLed ingest process restarted with nothing lost, SIGTERM leaving no process
behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_core import messages as m
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.errors import ServerConfigError
from fleet_server.ingest_process import RelayMetrics, apply_report
from fleet_server.ingest_supervisor import IngestSupervisor, child_specs
from fleet_server.metrics import ServerMetrics
from tests.support.broker import Mosquitto
from tests.support.mirror import free_port
from tests.support.stores import select, store_section

PREFIX = "fleet/v1"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g}s: {what}")


def child_pids(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.update(int(p) for p in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Server:
    """``python -m fleet_server.main`` with ``ingest.processes`` set, on 127.0.0.1 only."""

    def __init__(self, tmp: Path, mqtt_port: int, processes: int, store: StoreConfig) -> None:
        self.store = store
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        config = tmp / "server.yaml"
        where = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in store_section(store).items())
        config.write_text(f"mqtt:\n  port: {mqtt_port}\n  client_id: srv\nstore:\n{where}"
                          f"http:\n  port: {port}\ningest:\n  processes: {processes}\nlog_level: info\n")
        self.log = tmp / "server.log"
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleet_server.main", "--config", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)

    def health(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = httpx.get(f"{self.url}/healthz", timeout=2.0).json()
        except httpx.HTTPError:
            return {}
        return doc

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=5.0).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def wait_ok(self) -> None:
        wait_for(lambda: self.proc.poll() is None and self.health().get("status") == "ok", 30.0,
                 f"server healthy; log: {self.log.read_text()[-2000:]}")

    def stored_health(self) -> list[tuple[str, float]]:
        return [(str(d), float(t)) for d, t in select(self.store, "SELECT device, ts FROM health")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[mqtt.Client]:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="devices", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    yield pub
    pub.disconnect()
    pub.loop_stop()


def publish(pub: mqtt.Client, first: int, count: int) -> set[tuple[str, float]]:
    """Publish ``count`` QoS 1 health reports, each acknowledged by the broker; return their keys."""
    sent: set[tuple[str, float]] = set()
    for i in range(first, first + count):
        dev, ts = f"dev-{i % 7}", 1.7e9 + i
        msg = m.health_message(dev, commit=None, release=1, ts=ts, metrics={"cpu": 1.0}, checks=[])
        info = pub.publish(m.topic(PREFIX, dev, "health"), m.encode(msg), qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        sent.add((dev, ts))
    return sent


def test_processes_is_parsed_and_bounded(tmp_path: Path) -> None:
    def parse(**ingest: Any) -> int:
        return parse_server_config({"ingest": ingest}, tmp_path).ingest.processes
    assert parse() == 1
    with_user = parse_server_config({"mqtt": {"username": "fleet-server"}}, tmp_path).ingest.processes
    assert with_user == 0  # one broker user is one client id: a second connection would take it over
    assert parse(processes=0) == 0
    assert parse(processes=4) == 4
    for bad in (-1, 17, "two", True):
        with pytest.raises(ServerConfigError, match=r"ingest\.processes"):
            parse(processes=bad)


def test_client_ids_keep_the_session_with_one_process_and_share_with_several(tmp_path: Path) -> None:
    one = child_specs(parse_server_config({"mqtt": {"client_id": "srv"}}, tmp_path))
    assert [(s.client_id, s.share_group) for s in one] == [("srv", None)]
    two = child_specs(parse_server_config({"mqtt": {"client_id": "srv"}, "ingest": {"processes": 2}},
                                          tmp_path))
    assert [(s.client_id, s.share_group) for s in two] == [("srv-0", "srv"), ("srv-1", "srv")]


def test_a_relayed_report_adds_the_childs_counts_to_the_servers_metrics() -> None:
    relay, server = RelayMetrics(), ServerMetrics()
    relay.ingested("health", 3)
    relay.dropped("bad_schema")
    relay.observe_lag(0.2)
    relay.observe_batch(3)
    apply_report(server.ingest, relay.report())
    apply_report(server.ingest, relay.report())  # counted once: a report starts the counts afresh
    get = server.registry.get_sample_value
    assert get("fleet_messages_ingested_total", {"kind": "health"}) == 3
    assert get("fleet_messages_dropped_total", {"reason": "bad_schema"}) == 1
    assert get("fleet_ingest_lag_seconds_count") == 1
    assert get("fleet_ingest_batch_size_sum") == 3


def test_a_child_that_exits_is_reported_down_and_restarted(tmp_path: Path) -> None:
    config = parse_server_config({"store": {"path": str(tmp_path / "fleet.db")}}, tmp_path)
    metrics = ServerMetrics()
    sup = IngestSupervisor(config, metrics.ingest, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    sup.start()
    try:
        wait_for(lambda: sup.problems() == ["ingest process 0 down"], 10.0, "the exit seen")
        assert not sup.connected
        wait_for(lambda: (metrics.registry.get_sample_value("fleet_ingest_process_restarts_total") or 0) >= 2,
                 15.0, "restarted with backoff")
    finally:
        sup.stop()
    assert sup.pids() == []


def test_a_child_that_writes_garbage_is_not_reporting_and_the_server_goes_on(tmp_path: Path) -> None:
    config = parse_server_config({"store": {"path": str(tmp_path / "fleet.db")}}, tmp_path)
    metrics = ServerMetrics()
    garbage = ("import sys, time; sys.stdout.write('not json\\n[1]\\n{\"lag\": \"x\"}\\n'); "
               "sys.stdout.flush(); time.sleep(30)")
    sup = IngestSupervisor(config, metrics.ingest, command=[sys.executable, "-c", garbage], silent_after=0.5)
    sup.start()
    try:
        wait_for(lambda: sup.problems() == ["ingest process 0 not reporting"], 10.0, "the silence seen")
        assert len(sup.pids()) == 1  # still running: bad lines are skipped, not fatal
        assert metrics.registry.get_sample_value("fleet_ingest_lag_seconds_count") == 0
    finally:
        sup.stop(timeout=5.0)
    assert sup.pids() == []


@pytest.mark.parametrize("processes", [1, 2])
def test_every_acknowledged_report_is_stored_once_and_sigterm_leaves_no_process(
        tmp_path: Path, broker: Mosquitto, publisher: mqtt.Client, processes: int,
        store_config: StoreConfig) -> None:
    server = Server(tmp_path, broker.port, processes, store_config)
    try:
        server.wait_ok()
        children = child_pids(server.proc.pid)
        assert len(children) == processes
        sent = publish(publisher, 0, 300)
        wait_for(lambda: len(server.stored_health()) >= len(sent), 30.0, "every report stored")
        assert server.metric("fleet_ingest_processes_up") == processes
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        stored = server.stored_health()
    finally:
        server.kill()
    assert sorted(stored) == sorted(sent)  # each once, none missing, none twice
    for pid in children:
        wait_for(lambda pid=pid: not alive(pid), 10.0, f"ingest process {pid} gone")  # type: ignore[misc]


def test_a_killed_ingest_process_is_restarted_degraded_meanwhile_and_nothing_is_lost(
        tmp_path: Path, broker: Mosquitto, publisher: mqtt.Client, store_config: StoreConfig) -> None:
    server = Server(tmp_path, broker.port, 1, store_config)
    try:
        server.wait_ok()
        sent = publish(publisher, 0, 100)
        wait_for(lambda: len(server.stored_health()) >= len(sent), 30.0, "the first reports stored")
        (victim,) = child_pids(server.proc.pid)
        os.kill(victim, signal.SIGKILL)
        seen: list[dict[str, Any]] = []

        def degraded() -> bool:
            doc = server.health()
            seen.append(doc)
            return doc.get("status") == "degraded"
        wait_for(degraded, 10.0, "healthz degraded")
        sent |= publish(publisher, 100, 100)  # while no ingest process is there: the broker keeps them
        wait_for(lambda: len(child_pids(server.proc.pid) - {victim}) == 1, 30.0, "a new ingest process")
        server.wait_ok()
        wait_for(lambda: len(server.stored_health()) >= len(sent), 30.0, "every report stored")
        assert server.metric("fleet_ingest_process_restarts_total") == 1
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        stored = server.stored_health()
    finally:
        server.kill()
    assert sorted(stored) == sorted(sent)
    reasons = [r for doc in seen for r in doc.get("reasons", [])]
    assert "ingest process 0 down" in reasons or "broker unreachable" in reasons, reasons
    assert "exited with signal 9" in server.log.read_text()


def test_ingest_processes_stop_by_themselves_when_the_server_is_killed(
        tmp_path: Path, broker: Mosquitto, store_config: StoreConfig) -> None:
    server = Server(tmp_path, broker.port, 2, store_config)
    children: set[int] = set()
    try:
        server.wait_ok()
        children = child_pids(server.proc.pid)
        assert len(children) == 2
        server.kill()  # SIGKILL: no chance to stop its children
        for pid in children:
            wait_for(lambda pid=pid: not alive(pid), 20.0, f"ingest process {pid} gone")  # type: ignore[misc]
    finally:
        server.kill()
        for pid in children:  # only if the test failed: never leave them behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
