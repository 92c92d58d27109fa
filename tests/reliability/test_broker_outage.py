"""Broker outage under load: 50 devices report numbered events while Mosquitto is down for 30 s.

Each device is the agent's real reporting stack: a state database (SQLite file) whose outbox
takes every report first (``report.build.queue_report``), an :class:`MqttLink` (persistent session,
jittered reconnect) and an :class:`OutboxSender` draining the outbox in its own thread. 25 devices
live in each of two forked processes; every device queues 5 events a second, each carrying its
sequence number. On the other side the fleet server's real :class:`Ingestor` and store, on each backend.

Mosquitto is stopped by its pid (SIGTERM: it saves its database, as in a restart or an upgrade)
for 30 s while the devices keep reporting, then started again on the same port. Afterwards the
store must hold every event of every device exactly once, in each device's order, and its
counters must match what the devices sent; nothing may be dropped on either side.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import open_store
from tests.support.broker import Mosquitto
from tests.support.sim_device import SimDevice
from tests.support.stores import store_section
from tests.support.wait import wait_until

pytestmark = pytest.mark.slow

PREFIX = "fleet/v1"
HOSTS = 2
PER_HOST = 25
RATE = 5.0  # events per second per device
BEFORE, OUTAGE, AFTER = 5.0, 30.0, 5.0
TICKS = int(RATE * (BEFORE + OUTAGE + AFTER))  # every device queues exactly this many events


def device_host(port: int, ids: list[str], work: Path, go: Path, out: Path) -> None:
    """One forked process: start its devices, queue TICKS events each on a RATE schedule, drain.

    A tick that falls behind its due time (a loaded machine) is caught up at once, so every
    device sends the same number of events however slow the host runs.
    """
    result: dict[str, Any] = {"error": None}
    devices: list[SimDevice] = []
    try:
        devices = [SimDevice(i, port, work / i) for i in ids]
        for d in devices:
            d.start()
        wait_until(lambda: all(d.link.connected for d in devices), "every device to connect", 30)
        (work / "ready").write_text("")
        wait_until(go.exists, "the start signal", 30, 0.01)
        started = time.monotonic()
        tick = 0
        backlog = 0
        while tick < TICKS:
            for d in devices:
                d.emit()
            tick += 1
            if tick % int(RATE) == 0:
                backlog = max(backlog, sum(d.state.outbox_count() for d in devices))
            time.sleep(max(0.0, tick / RATE - (time.monotonic() - started)))
        result["emitted_for"] = time.monotonic() - started
        result["peak_backlog"] = backlog
        wait_until(lambda: all(d.state.outbox_count() == 0 for d in devices), "every outbox to drain", 120)
        result["drained_after"] = time.monotonic() - started
        result["sent"] = {d.id: d.seq for d in devices}
        result["refused"] = sum(d.sender.refused for d in devices)
        result["outbox_dropped"] = sum(sum(d.state.outbox_dropped().values()) for d in devices)
    except BaseException as exc:  # reported to the parent through the result file
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for d in devices:
            d.stop()
    out.write_text(json.dumps(result))


def test_fifty_devices_lose_nothing_over_a_30s_broker_outage(tmp_path: Path,
                                                             store_config: StoreConfig) -> None:
    with Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000",
                                                     "max_queued_messages 100000"]) as broker:
        ids = [f"dev-{n:03d}" for n in range(HOSTS * PER_HOST)]
        go = tmp_path / "go"
        ctx = multiprocessing.get_context("fork")  # before any thread of this process starts
        hosts = []
        for h in range(HOSTS):
            work = tmp_path / f"host-{h}"
            work.mkdir()
            proc = ctx.Process(target=device_host, args=(broker.port, ids[h::HOSTS], work, go,
                                                          tmp_path / f"result-{h}.json"))
            proc.start()
            hosts.append(proc)
        config = parse_server_config({"mqtt": {"port": broker.port, "client_id": "fleet-server-outage",
                                               "keepalive": 5},
                                      "store": store_section(store_config)}, tmp_path)
        store = open_store(config.store)
        ingestor = Ingestor(config, store, ServerMetrics().ingest)
        try:
            ingestor.start()
            assert ingestor.wait_connected(10)
            wait_until(lambda: all((tmp_path / f"host-{h}" / "ready").exists() for h in range(HOSTS)),
                       "the device hosts", 60)
            go.write_text("")
            time.sleep(BEFORE)
            before_outage = store.counters().get("ingested.events", 0)
            broker.stop()
            down_at = time.monotonic()
            time.sleep(OUTAGE)
            broker.start()
            up_at = time.monotonic()
            wait_until(lambda: ingestor.connected, "the fleet server to reconnect", 60)
            server_back = time.monotonic() - up_at
            for proc in hosts:
                proc.join(timeout=BEFORE + OUTAGE + AFTER + 150)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=10)
            results = [json.loads((tmp_path / f"result-{h}.json").read_text()) for h in range(HOSTS)]
            assert not [r["error"] for r in results if r["error"]], results
            sent: dict[str, int] = {}
            for r in results:
                sent.update(r["sent"])
            total = sum(sent.values())
            wait_until(lambda: store.counters().get("ingested.events", 0) >= total, "the server to ingest",
                       60)
            assert ingestor.drain(10)
            finished = time.monotonic() - down_at
            counters = store.counters()
            stored: dict[str, list[int]] = {}
            for dev in ids:
                rows = store.device_events(dev, limit=100_000)
                stored[dev] = [int(r["detail"]["detail"]["seq"]) for r in reversed(rows)]
        finally:
            ingestor.stop()
            store.close()
    per_device = {dev: len(seqs) for dev, seqs in stored.items()}
    print(f"\nbroker outage: {len(ids)} devices sent {total} events ({min(sent.values())}-"
          f"{max(sent.values())} each), {before_outage} stored before the outage; broker down {OUTAGE:.0f}s; "
          f"fleet server reconnected {server_back:.1f}s after the restart; everything stored "
          f"{finished - OUTAGE:.1f}s after the restart; "
          f"ingested.events counter {counters.get('ingested.events')} "
          f"(duplicates from at-least-once delivery: {counters.get('ingested.events', 0) - total}); "
          f"peak outbox backlog per host {[r['peak_backlog'] for r in results]}; "
          f"hosts drained their outboxes {[round(r['drained_after'], 1) for r in results]}s after the start")
    assert per_device == sent, {d: (per_device[d], sent[d]) for d in ids if per_device[d] != sent[d]}
    for dev, seqs in stored.items():
        assert seqs == list(range(sent[dev])), f"{dev}: events out of order or missing: {seqs[:20]}"
    assert counters.get("ingested.events", 0) >= total
    assert not {k: v for k, v in counters.items() if k.startswith("dropped.") and v}, counters
    assert all(r["refused"] == 0 and r["outbox_dropped"] == 0 for r in results), results
    # The outage really happened under load: a backlog built up on the devices and was drained after.
    assert set(sent.values()) == {TICKS}, sent
    assert all(r["peak_backlog"] >= PER_HOST * RATE * OUTAGE * 0.8 for r in results), results
    assert 0 < before_outage < total
