"""The fleet server's remote pause end to end: the API and ``fleetctl device pause|resume`` publish the
device's retained ``control`` message to a real Mosquitto and audit it; a real agent daemon (a real
`git daemon` mirror, signed releases, a tmp root) takes it, applies nothing while it stands, composes
it with its own pause, and keeps it across a restart. The server's side runs on each store backend."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from edge_agent.agent import pause, resume, status
from edge_core import messages
from fleet_server import fleetctl
from fleet_server.config import StoreConfig
from tests.support.agent_fleet import AgentFleet, base_release
from tests.support.agent_mqtt import (
    ALL,
    DEVICE,
    PREFIX,
    RunningAgent,
    decoded,
    events,
    has_event,
    mqtt_config,
)
from tests.support.api_server import ADMIN, Api, running_api
from tests.support.broker import Mosquitto, Subscriber, publish
from tests.support.wait import wait_until


@pytest.fixture
def api(tmp_path: Path, broker: Mosquitto, store_config: StoreConfig) -> Iterator[Api]:
    """The API over a filled store on each backend, publishing to the broker."""
    (tmp_path / "api").mkdir()
    with running_api(tmp_path / "api", broker_port=broker.port,
                     store_config=store_config) as served:
        yield served


def _post(api: Api, path: str, body: dict[str, object], token: str | None = ADMIN) -> httpx.Response:
    headers = {"X-Actor": "alice", **({"Authorization": f"Bearer {token}"} if token else {})}
    return httpx.post(api.url + path, json=body, headers=headers, timeout=10.0)


def test_a_pause_publishes_the_retained_control_message_and_is_audited(api: Api,
                                                                       broker: Mosquitto) -> None:
    answer = _post(api, "/api/v1/devices/cam-01/pause", {"reason": "INC-7: hands off"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"action": "pause", "devices": ["cam-01"], "reason": "INC-7: hands off"}
    with Subscriber(broker.port, [f"{PREFIX}/+/control"], client_id="watcher") as sub:
        assert sub.wait(lambda s: len(s.received) >= 1)  # retained: a late subscriber gets it
        [got] = sub.messages()
    assert got.retained
    msg = messages.decode("control", got.payload, topic_device="cam-01")
    assert (msg["paused"], msg["reason"]) == (True, "INC-7: hands off")
    [row] = api.store.audit(action="device.pause")
    assert (row["actor"], row["target"], row["reason"]) == ("alice", "device/cam-01", "INC-7: hands off")
    assert _post(api, "/api/v1/devices/cam-01/resume", {}).status_code == 200
    with Subscriber(broker.port, [f"{PREFIX}/cam-01/control"], client_id="watcher-2") as sub:
        assert sub.wait(lambda s: len(s.received) >= 1)
        resumed = messages.decode("control", sub.messages()[0].payload, topic_device="cam-01")
    assert resumed["paused"] is False


def test_pause_refusals_say_why(api: Api) -> None:
    assert _post(api, "/api/v1/devices/cam-01/pause", {"reason": "x"}, token=None).status_code == 401
    assert _post(api, "/api/v1/devices/cam-01/pause", {"reason": "x"}, token="wrong").status_code == 403
    no_reason = _post(api, "/api/v1/devices/cam-01/pause", {})
    assert (no_reason.status_code, no_reason.json()["error"]) == (400, "a pause needs a reason")
    unknown = _post(api, "/api/v1/devices/ghost-01/pause", {"reason": "x"})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown device ghost-01")
    assert _post(api, "/api/v1/devices/cam-01/stop", {"reason": "x"}).status_code == 404
    nothing = _post(api, "/api/v1/devices/pause", {"label": ["site=mars"], "reason": "x"})
    assert (nothing.status_code, nothing.json()["error"]) == (400, "no device matches the selector")
    assert api.store.audit(action="device.pause") == []


def test_fleetctl_pauses_and_resumes_by_id_and_by_label(api: Api, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "admin.token"
    token.write_text(ADMIN + "\n")
    token.chmod(0o600)
    common = ["--server", api.url, "--token-file", str(token), "--actor", "bob"]
    canaries = ["device", "pause", "--label", "ring=canary", "--reason", "canaries hold"]
    assert fleetctl.main([*canaries, *common]) == 0
    assert capsys.readouterr().out == "paused 2 device(s): cam-01, gw-01 (canaries hold)\n"
    assert fleetctl.main(["device", "resume", "gw-01", *common]) == 0
    assert capsys.readouterr().out == "resumed 1 device(s): gw-01\n"
    assert fleetctl.main(["device", "pause", "cam-02", *common]) == 1  # no reason: one line, no request
    assert "needs --reason" in capsys.readouterr().err
    assert fleetctl.main(["device", "cam-01", "--server", api.url]) == 0  # showing one is unchanged
    assert "device:      cam-01" in capsys.readouterr().out
    rows = api.store.audit(action="device.pause")
    assert sorted(r["target"] for r in rows) == ["device/cam-01", "device/gw-01"]
    assert {r["actor"] for r in rows} == {"bob"}


def _control(port: int, *, paused: bool, reason: str | None) -> None:
    msg = messages.control_message(DEVICE, paused=paused, reason=reason, ts=datetime.now(UTC))
    proc = publish(port, f"{PREFIX}/{DEVICE}/control", messages.encode(msg), retain=True)
    assert proc.returncode == 0, proc.stderr


def _nudge(port: int, revision: str, release: int) -> None:
    nudge = messages.nudge_message(revision=revision, release=release, ts=datetime.now(UTC))
    assert publish(port, messages.nudge_topic(PREFIX), messages.encode(nudge)).returncode == 0


def test_the_agent_takes_the_remote_pause_composes_it_with_its_own_and_keeps_it_across_a_restart(
        fleet: AgentFleet, broker: Mosquitto) -> None:
    first = fleet.publish(base_release(fleet.root))
    cfg = mqtt_config(fleet, broker.port, poll="1h")
    conf = fleet.root / "etc/app/app.conf"
    with Subscriber(broker.port, [ALL], client_id="watcher") as sub:
        sub.wait_subscribed(1)
        agent = RunningAgent(cfg)
        try:
            assert sub.wait(has_event("sync_succeeded", first), 20), sub.lines[-20:]
            _control(broker.port, paused=True, reason="INC-7 hands off")
            said = "fleet server: INC-7 hands off"
            assert sub.wait(lambda s: any(e["reason"] == said for e in events(s, "paused")), 10)
            assert sub.wait(lambda s: decoded(s, "status")[-1].get("pause_reason") == said, 10)
            assert decoded(sub, "status")[-1]["paused"] is True
            second = fleet.publish({"bundles/app/files/app.conf": "listen = 2\n"})
            _nudge(broker.port, second, 2)
            wait_until(lambda: (r := agent.daemon.last_result) is not None and r.commit == second,
                       "the paused device syncs the new release without applying it")
            assert agent.daemon.last_result is not None
            assert agent.daemon.last_result.outcome == "paused"
            assert conf.read_text() == "listen = 8443\nupstream = one\n"
        finally:
            agent.stop()
    agent = RunningAgent(cfg)  # restarted: the pause is in its state and retained at the broker
    try:
        wait_until(lambda: agent.daemon.last_result is not None, "the first sync after the restart")
        assert agent.daemon.last_result is not None
        assert agent.daemon.last_result.outcome == "paused"
        pause(cfg, "local works")  # the device's own pause on top
        _control(broker.port, paused=False, reason="INC-7 closed")
        wait_until(lambda: status(cfg)["paused_by_fleet_server"] is None, "the remote pause is lifted")
        assert status(cfg)["paused"] == "local works"  # still paused: its own pause holds
        syncs = agent.daemon.syncs
        _nudge(broker.port, second, 2)
        wait_until(lambda: agent.daemon.syncs > syncs, "a sync while paused locally")
        assert agent.daemon.last_result is not None
        assert agent.daemon.last_result.outcome == "paused"
        resume(cfg)
        _nudge(broker.port, second, 2)
        wait_until(lambda: conf.read_text() == "listen = 2\n", "applied once both pauses are lifted")
    finally:
        agent.stop()
