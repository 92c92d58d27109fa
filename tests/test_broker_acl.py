"""`fleetctl broker-config` files enforced by a real Mosquitto: each device stays in its own topics."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from edge_agent.report.mqtt import MqttLink, MqttSettings
from edge_core import messages as m
from fleet_server.broker_config import acl_text, read_device_ids
from fleet_server.errors import UsageError
from tests.support.broker import Mosquitto, Subscriber, publish
from tests.support.broker_files import fleetctl, generate_broker_files, password_of
from tests.support.mirror import free_port

pytestmark = pytest.mark.timeout(60)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_generated_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, summary = generate_broker_files(tmp_path, 1883, capsys)
    assert summary["devices"] == 3
    assert summary["created"] == ["fleet-server", "fleet-tool", "dev-a", "dev-b", "dev-c"]
    passwd = (out / "passwd").read_text(encoding="utf-8").splitlines()
    assert [line.split(":", 1)[0] for line in passwd] == ["fleet-server", "fleet-tool", "dev-a", "dev-b",
                                                          "dev-c"]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd)
    for user in ("fleet-server", "dev-a"):
        secret = password_of(out, user)
        assert len(secret) >= 24
        assert secret not in (out / "passwd").read_text(encoding="utf-8")
        assert stat.S_IMODE((out / "credentials" / f"{user}.password").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o600
    conf = (out / "mosquitto.conf").read_text(encoding="utf-8")
    for line in ("allow_anonymous false", "use_username_as_clientid true", "per_listener_settings false",
                 f"password_file {out.absolute()}/passwd", f"acl_file {out.absolute()}/acl"):
        assert line in conf.splitlines()
    acl = (out / "acl").read_text(encoding="utf-8")
    assert "pattern" not in acl
    assert "topic write fleet/v1/dev-a/status" in acl
    assert "topic read fleet/v1/dev-a/desired" in acl
    assert "topic read fleet/v1/dev-a/control" in acl  # its own remote pause, no one else's
    assert "topic read fleet/v1/dev-b/control" not in acl.split("user dev-b")[0].split("user dev-a")[1]
    assert "topic write fleet/v1/+/control" in acl  # the server users
    assert "topic read fleet/v1/dev-a/preflight" in acl  # a rollout's preflight request
    assert "topic write fleet/v1/dev-a/plan" in acl  # and the device's answer
    assert "topic write fleet/v1/+/preflight" in acl

    # a second run for one more device keeps everyone's password; --rotate changes them
    before = password_of(out, "dev-a")
    assert fleetctl(["broker-config", "--out", str(out), "--devices", "dev-a", "dev-d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] == ["dev-d"]
    assert password_of(out, "dev-a") == before
    assert fleetctl(["broker-config", "--out", str(out), "--devices", "dev-a", "--rotate"]) == 0
    assert password_of(out, "dev-a") != before
    assert "persistence_location /var/lib/mosquitto/" in (out / "mosquitto.conf").read_text().splitlines()
    # --data-dir names where the broker keeps its database
    data = tmp_path / "data"
    assert fleetctl(["broker-config", "--out", str(out), "--devices", "dev-a", "--data-dir", str(data)]) == 0
    assert f"persistence_location {data}/" in (out / "mosquitto.conf").read_text().splitlines()


def test_invalid_input_is_refused(tmp_path: Path) -> None:
    for bad in (["a/b"], ["dev+"], ["#"], ["-x"], ["ok", "x" * 70]):
        with pytest.raises(UsageError):
            read_device_ids(bad)
    with pytest.raises(UsageError):
        read_device_ids([])
    with pytest.raises(UsageError):
        acl_text(["dev-a"], prefix="fleet/#", server_users=["fleet-server"])
    with pytest.raises(UsageError):
        fleetctl(["broker-config", "--out", str(tmp_path), "--devices", "fleet-server"])
    assert not (tmp_path / "passwd").exists()


def _status(device: str) -> bytes:
    return m.encode(m.status_message(device, commit=COMMIT, release=1, sync_state="applied", drift={},
                                     paused=False, ts=1_700_000_000.0))


def test_the_broker_keeps_each_device_in_its_own_topics(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    out, _ = generate_broker_files(tmp_path, port, capsys)
    server_pw = password_of(out, "fleet-server")
    # the server's subscriber stays connected as fleet-server; what the server publishes goes through
    # a second server user (the user name is the client id: one connection each)
    tool_pw = password_of(out, "fleet-tool")
    conf = (out / "mosquitto.conf").read_text(encoding="utf-8")
    with Mosquitto(tmp_path / "mosquitto", port=port, base_config=conf) as broker:
        # no anonymous clients, no wrong passwords
        assert publish(port, "fleet/v1/dev-a/status", b"{}").returncode != 0
        assert publish(port, "fleet/v1/dev-a/status", b"{}", user="dev-a", password="wrong").returncode != 0

        with Subscriber(port, ["fleet/v1/#"], client_id="fleet-server", user="fleet-server",
                        password=server_pw) as server, \
             Subscriber(port, ["fleet/v1/dev-b/desired"], client_id="dev-b", user="dev-b",
                        password=password_of(out, "dev-b")) as dev_b:
            assert server.wait_subscribed(1) == [1]
            assert dev_b.wait_subscribed(1) == [1]

            link = MqttLink(MqttSettings(host="127.0.0.1", port=port, device_id="dev-a", username="dev-a",
                                         password=password_of(out, "dev-a"), reconnect_min=0.1,
                                         reconnect_max=0.5))
            link.start()
            try:
                assert link.wait_connected(10), broker.log_tail()
                nudge = m.encode(m.nudge_message(revision=COMMIT, release=9, ts=1.0))
                denied = [
                    link.publish("fleet/v1/dev-b/status", _status("dev-b"), qos=1, retain=True),
                    link.publish("fleet/v1/dev-b/events", b"{}", qos=1),
                    link.publish("fleet/v1/dev-a/desired", b"{}", qos=1),
                    link.publish("fleet/v1/_broadcast/nudge", nudge, qos=1),
                ]
                own = link.publish("fleet/v1/dev-a/status", _status("dev-a"), qos=1, retain=True)
                assert own.wait(10)
                assert not own.refused
                for tracking in denied:
                    assert tracking.wait(10)
                    assert tracking.refused
                    assert tracking.reason_code == 0x87
                # the own status came after the refused ones on one connection: the server has it,
                # and would have had the others before it
                assert server.wait(lambda s: any(r.topic == "fleet/v1/dev-a/status" for r in s.received))
            finally:
                link.stop(offline_wait=1.0)
            assert {r.topic for r in server.messages()} <= {"fleet/v1/dev-a/status", "fleet/v1/dev-a/online"}

            # dev-a cannot read dev-b's desired; the server can write it and dev-b reads it
            with Subscriber(port, ["fleet/v1/dev-b/desired", "fleet/v1/dev-a/desired"], client_id="dev-a",
                            user="dev-a", password=password_of(out, "dev-a")) as dev_a:
                dev_a.wait_subscribed(2)
                for device in ("dev-b", "dev-a"):
                    desired = m.encode(m.desired_message(device, revision=COMMIT, release=2, rollout_id=None,
                                                         ts=2.0))
                    done = publish(port, f"fleet/v1/{device}/desired", desired, user="fleet-tool",
                                   password=tool_pw, retain=True)
                    assert done.returncode == 0, done.stderr
                assert dev_b.wait(lambda s: len(s.received) >= 1)
                assert dev_a.wait(lambda s: any(r.topic == "fleet/v1/dev-a/desired" for r in s.received))
                assert [r.topic for r in dev_a.messages()] == ["fleet/v1/dev-a/desired"]
                assert [r.topic for r in dev_b.messages()] == ["fleet/v1/dev-b/desired"]
            # a device cannot write another device's desired (or the nudge); the server can nudge.
            # Mosquitto handles one message at a time: the server's nudge, sent after the device's
            # attempt was acknowledged, reaches the subscribers after anything that attempt produced.
            publish(port, "fleet/v1/dev-b/desired", b"{}", user="dev-a", password=password_of(out, "dev-a"))
            nudge = m.encode(m.nudge_message(revision=COMMIT, release=3, ts=3.0))
            assert publish(port, "fleet/v1/_broadcast/nudge", nudge, user="fleet-tool",
                           password=tool_pw).returncode == 0
            assert server.wait(lambda s: any(r.topic == "fleet/v1/_broadcast/nudge" for r in s.received))
            assert sum(r.topic == "fleet/v1/dev-b/desired" for r in server.messages()) == 1
            assert len(dev_b.messages()) == 1
