"""Adversarial: the broker `fleetctl broker-config` sets up refuses a report larger than the server
would ever accept, so it never reaches the server; its queues are sized for the server's client.

A real Mosquitto runs from the generated ``mosquitto.conf``; the clients are Mosquitto's own
``mosquitto_pub`` and ``mosquitto_sub``, independent of the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_core.messages import MAX_MESSAGE_BYTES
from fleet_server.broker_config import (
    MAX_PACKET_BYTES,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    MQTT_HEADER_HEADROOM,
    write_broker_config,
)
from tests.support.broker import Mosquitto, Subscriber, mosquitto_binary, publish
from tests.support.mirror import free_port

pytestmark = pytest.mark.timeout(90)

TOPIC = "fleet/v1/dev-a/status"


def _password(out: Path, user: str) -> str:
    return (out / "credentials" / f"{user}.password").read_text(encoding="utf-8").strip()


def test_generated_conf_names_every_limit_and_the_database_folder(tmp_path: Path) -> None:
    mosquitto_binary()
    files = write_broker_config(tmp_path / "out", ["dev-a"], data_dir=tmp_path / "data")
    lines = files.conf.read_text(encoding="utf-8").splitlines()
    assert f"max_packet_size {MAX_MESSAGE_BYTES + MQTT_HEADER_HEADROOM}" in lines
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}" in lines
    assert f"max_queued_bytes {MAX_QUEUED_BYTES}" in lines
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path / 'data'}/" in lines
    # one server burst from a 100,000-device fleet fits the server's queue
    assert MAX_QUEUED_MESSAGES >= 10 * 100_000


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_a_report_over_the_packet_limit_never_reaches_the_server(tmp_path: Path, version: str) -> None:
    """MQTT 3.1.1 clients cannot be told the limit, so they send and are disconnected; MQTT 5 clients
    learn it in CONNACK and their own library refuses. Either way nothing reaches the subscriber,
    while a report exactly at the ingest cap still goes through."""
    port = free_port()
    files = write_broker_config(tmp_path / "out", ["dev-a"], port=port, bind="127.0.0.1",
                                data_dir=tmp_path / "data")
    conf = files.conf.read_text(encoding="utf-8")
    device_pw = _password(files.out, "dev-a")
    with Mosquitto(tmp_path / "mosquitto", port=port, base_config=conf) as broker, \
         Subscriber(port, ["fleet/v1/#"], client_id="fleet-server", user="fleet-server",
                    password=_password(files.out, "fleet-server")) as server:
        assert server.wait_subscribed(1) == [1]
        for size in (MAX_PACKET_BYTES + 1, 1024 * 1024):
            publish(port, TOPIC, b"x" * size, user="dev-a", password=device_pw, version=version)
        at_cap = b"y" * MAX_MESSAGE_BYTES
        done = publish(port, TOPIC, at_cap, user="dev-a", password=device_pw, version=version)
        assert done.returncode == 0, done.stderr
        assert server.wait(lambda s: any(r.payload == at_cap for r in s.received)), broker.log_tail()
        assert [len(r.payload) for r in server.messages(TOPIC)] == [MAX_MESSAGE_BYTES]
