"""The fleet baseline through the ACL of `fleetctl broker-config`, enforced by a real Mosquitto:
every device reads it, only a server user writes it.

Before the baseline the generated ACL gave devices no read rule for ``<prefix>/_broadcast/baseline``,
so a device never received it and followed the branch head.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_agent.report.mqtt import MqttLink, MqttSettings
from edge_core import messages as m
from tests.support.broker import Mosquitto, Subscriber, publish
from tests.support.broker_files import generate_broker_files, password_of
from tests.support.mirror import free_port

pytestmark = pytest.mark.timeout(60)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOPIC = "fleet/v1/_broadcast/baseline"


def test_devices_read_the_baseline_and_only_the_server_writes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    out, _ = generate_broker_files(tmp_path, port, capsys)
    acl = (out / "acl").read_text(encoding="utf-8")
    assert f"topic read {TOPIC}" in acl
    conf = (out / "mosquitto.conf").read_text(encoding="utf-8")
    tool_pw = password_of(out, "fleet-tool")
    dev_b_pw = password_of(out, "dev-b")
    with Mosquitto(tmp_path / "mosquitto", port=port, base_config=conf), \
            Subscriber(port, [TOPIC], client_id="dev-b", user="dev-b", password=dev_b_pw) as dev_b:
        assert dev_b.wait_subscribed(1) == [1]
        received: list[dict[str, object]] = []
        link = MqttLink(MqttSettings(host="127.0.0.1", port=port, device_id="dev-a", username="dev-a",
                                     password=password_of(out, "dev-a"), reconnect_min=0.1,
                                     reconnect_max=0.5),
                        on_baseline=received.append)
        link.start()
        try:
            assert link.wait_connected(10)
            # a device cannot publish a baseline for the fleet
            forged = m.encode(m.baseline_message(revision="f" * 40, release=99, ts=1.0))
            denied = link.publish(TOPIC, forged, qos=1, retain=True)
            assert denied.wait(10)
            assert denied.refused
            assert denied.reason_code == 0x87
            # the server can, and every device reads it (the agent's own link decodes it)
            good = m.encode(m.baseline_message(revision=COMMIT, release=4, ts=2.0))
            done = publish(port, TOPIC, good, user="fleet-tool", password=tool_pw, retain=True)
            assert done.returncode == 0, done.stderr
            assert dev_b.wait(lambda s: len(s.received) >= 1)
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            link.stop(offline_wait=1.0)
        assert [r.payload for r in dev_b.messages()] == [good]
        assert [(x["revision"], x["release"]) for x in received] == [(COMMIT, 4)]
