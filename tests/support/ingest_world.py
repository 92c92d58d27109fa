"""A real Ingestor over a real store and a paho publisher for simulated devices."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet_server.config import ServerConfig, StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import open_store
from tests.support.stores import store_section


def make_config(tmp_path: Path, port: int, *, store: StoreConfig | None = None,
                **sections: Any) -> ServerConfig:
    """The server's config on ``port``; the store is ``store`` (either backend), else an SQLite file."""
    where = store_section(store if store is not None else StoreConfig(path=tmp_path / "fleet.db"))
    raw: dict[str, Any] = {"mqtt": {"port": port, "client_id": "fleet-server-test"}, "store": where}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_server_config(raw, tmp_path)


class Server:
    """An Ingestor with its store and metrics, stopped by the test's finaliser."""

    def __init__(self, config: ServerConfig) -> None:
        self.store = open_store(config.store)
        self.metrics = ServerMetrics()
        self.ingestor = Ingestor(config, self.store, self.metrics.ingest)

    def start(self) -> Server:
        self.ingestor.start()
        assert self.ingestor.wait_connected(10.0)
        time.sleep(0.2)  # the SUBACK
        return self

    def stop(self) -> None:
        self.ingestor.stop()
        self.store.close()

    def dropped(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("fleet_messages_dropped_total", {"reason": reason})
        return value or 0.0


class Publisher:
    """A paho client publishing QoS 1 for any number of device ids (a gateway of simulated devices)."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1, retain=retain))

    def flush(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            assert info.is_published()
        self.infos.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
