"""``mqtt.share_group``: several Ingestors split the device reports through an MQTT 5 shared
subscription on a real Mosquitto, each report stored exactly once, on each store backend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_core import messages as m
from fleet_server.config import ServerConfig, StoreConfig, parse_server_config
from fleet_server.errors import ServerConfigError
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import FleetStore, open_store
from tests.support.broker import Mosquitto
from tests.support.stores import store_section

PREFIX = "fleet/v1"


def config(tmp_path: Path, port: int, store: StoreConfig | None = None, **mqtt_extra: Any) -> ServerConfig:
    where = store_section(store or StoreConfig(path=tmp_path / "fleet.db"))
    return parse_server_config({"mqtt": {"port": port, **mqtt_extra}, "store": where}, tmp_path)


def test_share_group_is_parsed_and_validated(tmp_path: Path) -> None:
    assert config(tmp_path, 1883).mqtt.share_group is None
    assert config(tmp_path, 1883, share_group="ingest").mqtt.share_group == "ingest"
    for bad in ("a/b", "a+", "#", "", "x" * 65):
        with pytest.raises(ServerConfigError, match="share_group"):
            config(tmp_path, 1883, share_group=bad)


def test_two_workers_of_one_share_group_split_the_reports_and_store_each_once(
        tmp_path: Path, broker: Mosquitto, store_config: StoreConfig) -> None:
    store = open_store(store_config)
    metrics = [ServerMetrics() for _ in range(2)]
    workers = [Ingestor(config(tmp_path, broker.port, store_config, share_group="ingest",
                               client_id=f"fleet-server-{n}"), store, metrics[n].ingest) for n in range(2)]
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
    try:
        for w in workers:
            w.start()
            assert w.wait_connected(10.0)
        time.sleep(0.3)  # the SUBACKs
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        sent = 40
        for i in range(sent):
            dev = f"dev-{i % 5}"
            msg = m.health_message(dev, commit=None, release=1, ts=1.7e9 + i, metrics={"cpu": 1.0}, checks=[])
            pub.publish(m.topic(PREFIX, dev, "health"), m.encode(msg), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while store.counters().get("ingested.health", 0) < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        for w in workers:
            assert w.drain(5.0)
        per_worker = [mt.registry.get_sample_value("fleet_messages_ingested_total", {"kind": "health"})
                      for mt in metrics]
    finally:
        pub.disconnect()
        pub.loop_stop()
        for w in workers:
            w.stop()
    assert store.counters().get("ingested.health", 0) == sent
    assert all(v for v in per_worker), per_worker  # both workers took a share
    assert sum(v or 0 for v in per_worker) == sent  # and no report went to both
    store.close()


def retain(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


def learned(store: FleetStore) -> list[tuple[Any, Any]]:
    rows = [store.device(f"dev-{i}") for i in range(3)]
    return [(r["release"], r["online"]) if r else (None, None) for r in rows]


def test_replicas_of_a_share_group_learn_retained_status_and_online_and_store_live_ones_once(
        tmp_path: Path, broker: Mosquitto, store_config: StoreConfig) -> None:
    store = open_store(store_config)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    metrics = [ServerMetrics() for _ in range(2)]
    workers = [Ingestor(config(tmp_path, broker.port, store_config, share_group="ingest",
                               client_id=f"fleet-server-{n}"), store, metrics[n].ingest) for n in range(2)]
    try:
        # published retained before any replica subscribed: a shared subscription never gets them
        for i in range(3):
            dev = f"dev-{i}"
            status = m.status_message(dev, commit="a" * 40, release=4, sync_state="in_sync", drift={},
                                      paused=False, ts=1.7e9 + i)
            retain(pub, m.topic(PREFIX, dev, "status"), m.encode(status))
            retain(pub, m.topic(PREFIX, dev, "online"), m.encode(m.online_message(dev, True, 1.7e9 + i)))
        for w in workers:
            w.start()
            assert w.wait_connected(10.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and learned(store) != [(4, True)] * 3:
            time.sleep(0.05)
        assert learned(store) == [(4, True)] * 3
        # a live status reaches one replica through the group; the plain subscription's copy is passed
        live = m.status_message("dev-0", commit="b" * 40, release=5, sync_state="applied", drift={},
                                paused=False, ts=1.7e9 + 100)
        retain(pub, m.topic(PREFIX, "dev-0", "status"), m.encode(live))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (store.device("dev-0") or {}).get("release") != 5:
            time.sleep(0.05)
        for w in workers:
            assert w.drain(5.0)
        per_worker = [mt.registry.get_sample_value("fleet_messages_ingested_total", {"kind": "status"}) or 0
                      for mt in metrics]
    finally:
        pub.disconnect()
        pub.loop_stop()
        for w in workers:
            w.stop()
    device = store.device("dev-0")
    assert device is not None
    assert device["release"] == 5
    # each replica stored the three retained copies once; the live one was stored by one replica only
    assert sum(per_worker) == 2 * 3 + 1, per_worker
    store.close()
