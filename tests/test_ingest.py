"""MQTT ingest against a real Mosquitto, real paho publishers and a real SQLite store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_core import messages as m
from fleet_server import ingest as ingest_module
from fleet_server.config import ServerConfig
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import Store, open_store
from tests.support.broker import Mosquitto, Subscriber
from tests.support.ingest_world import Publisher, Server, make_config
from tests.support.mirror import free_port, wait_for_port
from tests.support.stores import run_sql
from tests.support.wait import wait_until

PREFIX = "fleet/v1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000",
                                                     "max_queued_messages 100000"]) as b:
        yield b


@pytest.fixture
def servers() -> Iterator[Callable[[ServerConfig], Server]]:
    started: list[Server] = []

    def make(config: ServerConfig) -> Server:
        s = Server(config)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    p = Publisher(broker.port, "gateway-1")
    yield p
    p.close()


def t(device: str, kind: str) -> str:
    return f"{PREFIX}/{device}/{kind}"


def now_ts() -> float:
    return time.time()


def test_reports_from_several_devices_arrive(tmp_path, broker, publisher, servers, store_config):
    server = servers(make_config(tmp_path, broker.port, store=store_config)).start()
    for i in range(5):
        dev = f"dev-{i}"
        publisher.send(t(dev, "online"), m.encode(m.online_message(dev, True, now_ts())), retain=True)
        publisher.send(t(dev, "status"), m.encode(m.status_message(
            dev, commit=COMMIT, release=4, sync_state="applied", drift={"drifted": i}, paused=False,
            ts=now_ts())), retain=True)
        publisher.send(t(dev, "events"), m.encode(m.event_message(
            dev, type="sync_succeeded", commit=COMMIT, release=4, ts=now_ts(), detail={"changes": i})))
        publisher.send(t(dev, "health"), m.encode(m.health_message(
            dev, commit=COMMIT, release=4, ts=now_ts(), metrics={"cpu": 10.0 + i},
            checks=[{"name": "web", "ok": True}])))
    publisher.flush()
    wait_until(lambda: server.store.counters().get("ingested.health", 0) == 5, "5 health reports")
    assert server.ingestor.drain(5.0)
    devices = server.store.devices()
    assert [d["id"] for d in devices] == [f"dev-{i}" for i in range(5)]
    for i, d in enumerate(devices):
        assert d["online"] is True
        assert (d["release"], d["revision"], d["sync_state"]) == (4, COMMIT, "applied")
        assert d["drift"] == {"drifted": i}
        assert d["last_event"] == "sync_succeeded"
    [ev] = server.store.device_events("dev-3")
    assert ev["type"] == "sync_succeeded"
    assert ev["detail"] == {"detail": {"changes": 3}}
    [h] = server.store.device_health("dev-2")
    assert h["metrics"] == {"cpu": 12.0}
    assert server.store.counters() == {"ingested.events": 5, "ingested.health": 5, "ingested.online": 5,
                                       "ingested.status": 5}
    reg = server.metrics.registry
    assert reg.get_sample_value("fleet_messages_ingested_total", {"kind": "status"}) == 5
    assert reg.get_sample_value("fleet_ingest_lag_seconds_count") == 20


def test_bad_messages_are_dropped_and_counted(tmp_path, broker, publisher, servers, store_config):
    server = servers(make_config(tmp_path, broker.port, store=store_config,
                                 ingest={"max_payload_bytes": 1024})).start()
    good = m.encode(m.online_message("dev-1", True, now_ts()))
    publisher.send(t("dev-1", "online"), b"{not json")
    publisher.send(t("dev-1", "online"), b"\xff\xfe")
    publisher.send(t("dev-1", "online"), json.dumps({"schema": 99, "device": "dev-1"}).encode())
    publisher.send(t("dev-1", "online"), b"[" * 2000)  # oversized: refused before parsing
    publisher.send(t("dev-2", "online"), good)  # dev-1's message published under dev-2
    publisher.send(t("dev-1", "online"), good.replace(b'"online":true', b'"online":"yes"'))
    publisher.send(t("dev-1", "online"), good)
    publisher.flush()
    wait_until(lambda: server.store.known_device("dev-1"), "dev-1 to be known")
    assert server.ingestor.drain(5.0)
    assert not server.store.known_device("dev-2")
    expected = {"malformed_json": 2, "bad_schema": 1, "oversized": 1, "spoofed": 1, "bad_field": 1}
    for reason, n in expected.items():
        assert server.dropped(reason) == n, reason
    wait_until(lambda: server.store.counters() == {
        "dropped.bad_field": 1, "dropped.bad_schema": 1, "dropped.malformed_json": 2,
        "dropped.oversized": 1, "dropped.spoofed": 1, "ingested.online": 1}, "the counters")


def test_unknown_devices_are_refused_under_the_refuse_policy(tmp_path, broker, publisher, servers,
                                                            store_config):
    config = make_config(tmp_path, broker.port, store=store_config, ingest={"unknown_devices": "refuse"})
    seed = open_store(config.store)
    seed.register_device("known-1", labels={"site": "a"})
    seed.close()
    server = servers(config).start()
    for dev in ("known-1", "stranger", "known-2"):
        publisher.send(t(dev, "online"), m.encode(m.online_message(dev, True, now_ts())))
    publisher.flush()
    wait_until(lambda: (server.store.device("known-1") or {}).get("online") is True, "known-1 online")
    wait_until(lambda: server.dropped("unknown_device") == 2, "2 unknown-device drops")
    server.store.register_device("known-2")  # registered later: accepted once the short refusal cache ends
    assert not server.store.known_device("stranger")
    assert server.ingestor.drain(5.0)
    assert server.store.counters().get("dropped.unknown_device") == 2


@pytest.mark.slow
def test_flood_of_20k_messages_is_absorbed_and_the_server_keeps_serving(tmp_path, broker, servers,
                                                                        store_config):
    server = servers(make_config(tmp_path, broker.port, store=store_config)).start()
    pubs = [Publisher(broker.port, f"flood-{k}") for k in range(2)]
    try:
        good = 0
        for i in range(20000):
            p = pubs[i % 2]
            dev = f"dev-{i % 500}"
            if i % 4 == 0:
                p.send(t(dev, "events"), b"garbage %d" % i)
            elif i % 4 == 1:
                p.send(t(f"dev-{(i + 1) % 500}", "health"), m.encode(m.health_message(
                    dev, commit=None, release=None, ts=1000.0 + i, metrics={}, checks=[])))  # spoofed
            else:
                good += 1
                p.send(t(dev, "health"), m.encode(m.health_message(
                    dev, commit=None, release=None, ts=1000.0 + i, metrics={"i": i}, checks=[])))
        for p in pubs:
            p.flush(60.0)
    finally:
        for p in pubs:
            p.close()

    def total() -> int:
        return sum(server.store.counters().values())

    wait_until(lambda: total() == 20000, "all 20000 messages stored", timeout=60.0)
    c = server.store.counters()
    assert c == {"dropped.malformed_json": 5000, "dropped.spoofed": 5000, "ingested.health": good}
    # still serving: a new report arrives
    late = Publisher(broker.port, "late")
    try:
        late.send(t("dev-late", "online"), m.encode(m.online_message("dev-late", True, now_ts())))
        late.flush()
    finally:
        late.close()
    wait_until(lambda: server.store.known_device("dev-late"), "dev-late to be known")


def test_messages_sent_while_the_server_is_down_are_not_lost(tmp_path, broker, publisher, servers,
                                                            store_config):
    config = make_config(tmp_path, broker.port, store=store_config)
    first = servers(config).start()
    first.stop()  # persistent session: the broker keeps queueing for the server's client id
    for i in range(300):
        publisher.send(t(f"dev-{i % 7}", "events"), m.encode(m.event_message(
            f"dev-{i % 7}", type="drift_detected", commit=None, release=None, ts=2000.0 + i)))
    publisher.flush()
    broker.restart()  # and the broker itself restarts in between: the session is on disk
    second = servers(config).start()
    wait_until(lambda: second.store.counters().get("ingested.events", 0) >= 300, "300 events",
               timeout=30.0)
    assert second.ingestor.drain(5.0)
    stored = sum(len(second.store.device_events(f"dev-{k}", limit=1000)) for k in range(7))
    assert stored == 300


def test_publish_desired_and_nudge(tmp_path, broker, servers):
    server = servers(make_config(tmp_path, broker.port)).start()
    server.ingestor.publish_desired("dev-9", COMMIT, 12, "rollout-1", wait=5.0)
    server.ingestor.publish_nudge(COMMIT, 12, wait=5.0)
    with Subscriber(broker.port, [t("dev-9", "desired")], client_id="dev-9") as sub:
        sub.wait_subscribed(1)
        assert sub.wait(lambda s: len(s.received) >= 1)
        [got] = sub.messages()
    assert got.retained
    msg = m.decode("desired", got.payload, topic_device="dev-9")
    assert (msg["revision"], msg["release"], msg["rollout_id"]) == (COMMIT, 12, "rollout-1")


def test_drain_waits_for_a_batch_the_writer_has_taken_but_not_committed(tmp_path, monkeypatch):
    # the writer waits two seconds for more messages: the first is off the queue, not yet committed
    monkeypatch.setattr(ingest_module, "_IDLE_FLUSH", 2.0)
    config = make_config(tmp_path, 1, ingest={"batch_interval": "2s"})
    store = Store(config.store.path)
    ingestor = Ingestor(config, store, ServerMetrics().ingest)
    ingestor.start(connect=False)
    try:
        assert ingestor.handle_message(t("dev-d", "events"), b"not json") == "malformed_json"
        wait_until(ingestor._queue.empty, "the writer to take the batch", timeout=5.0)  # it holds it now
        assert store.counters() == {}
        assert ingestor.drain(10.0)
        assert store.counters() == {"dropped.malformed_json": 1}
    finally:
        ingestor.stop()
        store.close()


def test_a_bug_in_the_write_path_is_retried_not_counted_as_a_refused_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ingest_module, "_RETRY_PAUSE", 0.05)
    config = make_config(tmp_path, 1)
    store = Store(config.store.path)
    metrics = ServerMetrics()
    ingestor = Ingestor(config, store, metrics.ingest)
    real_apply = store.apply_batch
    calls = {"n": 0, "broken": True}

    def apply_with_a_bug(batch):
        calls["n"] += 1
        if calls["broken"]:
            raise TypeError("a bug in the write path")
        return real_apply(batch)

    monkeypatch.setattr(store, "apply_batch", apply_with_a_bug)
    ingestor.start(connect=False)
    try:
        event = m.encode(m.event_message("dev-b", type="sync_succeeded", commit=COMMIT, release=4,
                                         ts=now_ts()))
        assert ingestor.handle_message(t("dev-b", "events"), event) is None
        wait_until(lambda: calls["n"] >= 3, "3 write attempts", timeout=10.0)  # retried, not given up on
        assert metrics.registry.get_sample_value("fleet_messages_dropped_total",
                                                 {"reason": "store_refused"}) == 0
        assert "the ingest writer failed" in caplog.text
        calls["broken"] = False
        assert ingestor.drain(10.0)
        assert [e["type"] for e in store.device_events("dev-b")] == ["sync_succeeded"]
        assert store.counters() == {"ingested.events": 1}
    finally:
        ingestor.stop()
        store.close()


def test_a_message_the_database_refuses_is_dropped_and_counted_and_the_rest_stored(tmp_path, monkeypatch,
                                                                                   store_config):
    monkeypatch.setattr(ingest_module, "_IDLE_FLUSH", 0.5)  # one batch for the three messages
    config = make_config(tmp_path, 1, store=store_config)
    store = open_store(config.store)
    # a real constraint of the real database refuses one row
    run_sql(store_config,
            sqlite="CREATE TRIGGER refuse_dev_x BEFORE INSERT ON health WHEN NEW.device = 'dev-x'"
                   " BEGIN SELECT RAISE(ABORT, 'refused by a constraint'); END",
            postgresql="ALTER TABLE health ADD CONSTRAINT refuse_dev_x CHECK (device <> 'dev-x')")
    metrics = ServerMetrics()
    ingestor = Ingestor(config, store, metrics.ingest)
    ingestor.start(connect=False)
    try:
        for dev in ("dev-a", "dev-x", "dev-c"):
            health = m.encode(m.health_message(dev, commit=COMMIT, release=4, ts=now_ts(),
                                               metrics={"cpu": 1.0}, checks=[]))
            assert ingestor.handle_message(t(dev, "health"), health) is None
        assert ingestor.drain(10.0)
        assert metrics.registry.get_sample_value("fleet_messages_dropped_total",
                                                 {"reason": "store_refused"}) == 1
        assert store.counters() == {"dropped.store_refused": 1, "ingested.health": 2}
        assert [len(store.device_health(d)) for d in ("dev-a", "dev-x", "dev-c")] == [1, 0, 1]
    finally:
        ingestor.stop()
        store.close()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=12)


def _payloads() -> st.SearchStrategy[bytes]:
    valid = st.builds(lambda ts, r: m.encode(m.status_message(
        "dev-f", commit=None, release=r, sync_state="applied", drift={}, paused=False, ts=ts)),
        st.floats(min_value=0, max_value=4e9), st.integers(min_value=0, max_value=2**40))
    base = {"schema": 1, "device": "dev-f", "ts": "2024-01-01T00:00:00Z"}
    mutated = st.builds(lambda extra: json.dumps({**base, **extra}).encode(),
                        st.dictionaries(st.sampled_from(["commit", "release", "sync_state", "drift", "paused",
                                                         "online", "x"]), _json_values, max_size=5))
    any_json = _json_values.map(lambda v: json.dumps(v).encode())
    return st.one_of(st.binary(max_size=300), any_json, valid, mutated)


@pytest.mark.slow
def test_fuzz_decode_and_ingest_never_raise_and_account_for_everything(tmp_path, store_config):
    config = make_config(tmp_path, 1, store=store_config)
    store = open_store(config.store)
    metrics = ServerMetrics()
    ingestor = Ingestor(config, store, metrics.ingest)
    ingestor.start(connect=False)
    sent = {"n": 0}
    topics = st.sampled_from([t("dev-f", k) for k in ("status", "online", "events", "health")]
                             + [t("other", "status"), "fleet/v1/bad id/status", "fleet/v1/dev-f/desired"])
    try:
        @settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(topic=topics, payload=_payloads())
        def one(topic: str, payload: bytes) -> None:
            ingestor.handle_message(topic, payload)
            sent["n"] += 1

        one()
        assert ingestor.drain(20.0)
        counters = store.counters()
        assert sum(counters.values()) == sent["n"]
        assert sent["n"] >= 1000
        assert counters.get("ingested.status", 0) > 0
    finally:
        ingestor.stop()
        store.close()


def test_fleet_server_process_ingests_serves_and_stops_on_sigterm(tmp_path, broker, publisher):
    http_port = free_port()
    db = tmp_path / "server.db"
    (tmp_path / "server.yaml").write_text("mqtt:\n  client_id: fleet-server-e2e\nlog_level: info\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet_server.main", "--config", str(tmp_path / "server.yaml"),
         "--mqtt-port", str(broker.port), "--http-port", str(http_port), "--db", str(db),
         "--set", "ingest.batch_interval=50ms"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(http_port, timeout=20.0, alive=lambda: proc.poll() is None)
        health: dict[str, object] = {}
        deadline = time.monotonic() + 10.0
        while health.get("status") != "ok" and time.monotonic() < deadline:  # ok once connected
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as r:
                health = json.loads(r.read())
            time.sleep(0.1)
        assert health == {"status": "ok", "broker_connected": True, "ingest_backlog_seconds": 0.0,
                          "store": "sqlite", "role": "leader"}
        publisher.send(t("dev-e2e", "status"), m.encode(m.status_message(
            "dev-e2e", commit=COMMIT, release=2, sync_state="applied", drift={}, paused=False, ts=now_ts(),
            labels={"site": "north", "canary": "true"}, profile="rpi4")))
        publisher.send(t("dev-other", "status"), m.encode(m.status_message(
            "dev-other", commit=COMMIT, release=2, sync_state="applied", drift={}, paused=False, ts=now_ts(),
            labels={"site": "south"})))
        publisher.flush()

        def listed(query: str = "") -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{http_port}/api/v1/devices{query}"
            with urllib.request.urlopen(url, timeout=5) as r:
                doc = json.loads(r.read())
            return list(doc["devices"])

        wait_until(lambda: len(listed()) == 2, "2 devices listed", timeout=15.0)
        [found] = listed("?label=site:north")
        assert (found["id"], found["labels"], found["profile"]) == (
            "dev-e2e", {"site": "north", "canary": "true"}, "rpi4")
        assert [d["id"] for d in listed("?label=site:south")] == ["dev-other"]
        assert listed("?label=site:north&label=canary:false") == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        proc.stderr and proc.stderr.close()
    assert "fleet server stopped" in stderr
    s = Store(db)
    try:
        assert s.device("dev-e2e") is not None
    finally:
        s.close()
