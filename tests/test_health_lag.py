"""``/healthz`` and the ingest-state gauges tell the truth about the broker connection and the ingest
lag: a real Mosquitto stopped and started by pid, a real store on each backend whose write lock
another connection holds (so the writer cannot commit), the real Ingestor and the real app."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_core.messages import encode, status_message, topic
from fleet_server.api import ApiActions, create_app
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.health import BROKER_UNREACHABLE
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import FleetStore, open_store
from tests.support.api_server import serve_app
from tests.support.broker import Mosquitto, publish
from tests.support.stores import store_section
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(90)

MAX_LAG = 0.5
PREFIX = "fleet/v1"


@dataclass
class Server:
    broker: Mosquitto
    store_config: StoreConfig
    store: FleetStore
    ingestor: Ingestor
    url: str

    def health(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/healthz", timeout=10.0)
        assert answer.status_code == 200
        body: dict[str, Any] = answer.json()
        return body

    def gauge(self, name: str) -> float | None:
        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        for family in text_string_to_metric_families(text):
            if family.name == name:
                return float(family.samples[0].value)
        return None

@pytest.fixture
def server(tmp_path: Path, store_config: StoreConfig) -> Iterator[Server]:
    """A started Mosquitto, the Ingestor connected to it and the app, with ingest.max_lag = 0.5 s, over
    a store on each backend."""
    broker = Mosquitto(tmp_path / "broker").start()
    config = parse_server_config({"mqtt": {"port": broker.port, "client_id": "health-server"},
                                  "store": store_section(store_config),
                                  "ingest": {"max_lag": MAX_LAG}}, tmp_path)
    store = open_store(config.store)
    metrics = ServerMetrics()
    ingestor = Ingestor(config, store, metrics.ingest)
    try:
        ingestor.start()
        assert ingestor.wait_connected(10.0)
        app = create_app(store, config, metrics, actions=ApiActions())
        with serve_app(app) as url:
            yield Server(broker, store_config, store, ingestor, url)
    finally:
        ingestor.stop(timeout=5.0)
        store.close()
        broker.stop()


@contextlib.contextmanager
def write_lock_held(config: StoreConfig) -> Iterator[None]:
    """Hold the write lock of the store's database from another connection until the block ends, as a
    long transaction of another program would: SQLite's database lock, PostgreSQL's locks on the
    tables the ingest writes (reads go on)."""
    if config.backend == "sqlite":
        blocker = sqlite3.connect(str(config.path), timeout=5.0, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    assert config.password_file is not None
    password = config.password_file.read_text().strip()
    with psycopg.connect(config.url, password=password) as pg:  # one transaction until the rollback
        try:
            pg.execute("LOCK TABLE devices, device_changes, events, health, counters IN EXCLUSIVE MODE")
            yield
        finally:
            pg.rollback()


def test_healthz_is_degraded_while_the_broker_is_down(server: Server) -> None:
    assert server.health() == {"status": "ok", "store": server.store_config.backend, "broker_connected": True,
                               "ingest_backlog_seconds": 0.0}
    assert server.gauge("fleet_broker_connected") == 1.0
    server.broker.stop()
    wait_until(lambda: server.health()["status"] == "degraded", "degraded after the broker stopped", 10.0)
    down = server.health()
    assert down["reasons"] == [BROKER_UNREACHABLE]
    assert down["broker_connected"] is False
    assert server.gauge("fleet_broker_connected") == 0.0
    server.broker.start()
    wait_until(lambda: server.health()["status"] == "ok", "ok after the broker came back", 45.0)
    assert server.gauge("fleet_broker_connected") == 1.0


def test_healthz_is_degraded_while_received_messages_wait_for_the_store(server: Server) -> None:
    with write_lock_held(server.store_config):  # the writer cannot commit
        msg = status_message("dev-lag", commit="c" * 40, release=1, sync_state="in_sync", drift={},
                             paused=False, ts=time.time())
        assert publish(server.broker.port, topic(PREFIX, "dev-lag", "status"), encode(msg)).returncode == 0
        wait_until(lambda: server.health()["status"] == "degraded",
                   "degraded while the store is locked", 15.0)
        lagging = server.health()
        assert len(lagging["reasons"]) == 1
        assert lagging["reasons"][0].startswith("ingest lag ")
        assert lagging["reasons"][0].endswith(f"over the {MAX_LAG:g} s limit")
        assert lagging["broker_connected"] is True
        assert lagging["ingest_backlog_seconds"] > MAX_LAG
        backlog = server.gauge("fleet_ingest_backlog_age_seconds")
        assert backlog is not None
        assert backlog > MAX_LAG
        assert server.store.device("dev-lag") is None
    wait_until(lambda: server.health()["status"] == "ok", "ok once the store commits again", 35.0)
    assert server.store.device("dev-lag") is not None
    assert server.gauge("fleet_ingest_backlog_age_seconds") == 0.0
    delay = server.gauge("fleet_ingest_commit_delay_seconds")
    assert delay is not None
    assert delay > MAX_LAG


class SlowRunner:
    """A rollout source that answers at once, then blocks as a long tick does."""

    def __init__(self) -> None:
        self.free = threading.Event()
        self.free.set()
        self.calls = 0

    def metrics_snapshot(self) -> list[dict[str, Any]]:
        assert self.free.wait(30.0)
        self.calls += 1
        return [{"id": "r-1", "release": 2, "phase": "running", "wave": self.calls,
                 "waves": [{"applied": 3}], "gates": [{"passed": 1, "failed": 0}]}]


def test_metrics_answer_while_the_runner_is_busy() -> None:
    runner = SlowRunner()
    metrics = ServerMetrics()
    metrics.attach_rollouts(runner)
    assert b'fleet_rollout_wave{rollout="r-1"} 1.0' in metrics.exposition()
    runner.free.clear()  # a tick holds the runner from now on (the old collector blocked on it)
    text = metrics.exposition()
    assert b'fleet_rollout_wave{rollout="r-1"} 1.0' in text  # the previous snapshot
    assert b"fleet_ingest_queue_depth" in text
    runner.free.set()
    wait_until(lambda: b'fleet_rollout_wave{rollout="r-1"} 2.0' in metrics.exposition(),
               "the fresh snapshot once the tick ended", 10.0)
