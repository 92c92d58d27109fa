"""The agent over MQTT end to end: a real Mosquitto, a real `git daemon` mirror, signed releases, the
real daemon in a thread with a tmp root. The broker side is watched with ``mosquitto_sub``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import check_drift, pause, resume, sync_once
from edge_agent.report import build as reporter
from edge_agent.state import StateDB
from edge_core import messages
from tests.support.agent_fleet import AgentFleet, base_release
from tests.support.agent_mqtt import (
    ALL,
    DEVICE,
    PREFIX,
    RunningAgent,
    decoded,
    events,
    has_event,
    kind_of,
    mqtt_config,
)
from tests.support.broker import Mosquitto, Subscriber, publish
from tests.support.wait import wait_until


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as b:
        yield b


def outbox_rows(fleet: AgentFleet) -> list[tuple[str, bytes]]:
    return fleet.outbox()


def outbox_count(fleet: AgentFleet) -> int:
    db = StateDB(fleet.state_dir / "state.db")
    try:
        return db.outbox_count()
    finally:
        db.close()



def publish_desired(port: int, revision: str, release: int) -> None:
    msg = messages.desired_message(DEVICE, revision=revision, release=release, rollout_id="r-1",
                                   ts=datetime.now(UTC))
    proc = publish(port, f"{PREFIX}/{DEVICE}/desired", messages.encode(msg), retain=True)
    assert proc.returncode == 0, proc.stderr


def test_every_outbox_row_decodes(fleet: AgentFleet) -> None:
    """Sync, refuse, drift, pause and resume without a broker: every queued report passes the decoder."""
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config).outcome == "applied"
    assert sync_once(fleet.config).outcome == "noop"
    (fleet.root / "etc/motd").write_text("drifted\n")
    assert check_drift(fleet.config).corrected
    fleet.push_unsigned({"bundles/app/files/app.conf": "evil\n"})
    assert sync_once(fleet.config).outcome == "refused"
    pause(fleet.config, "maintenance window")
    resume(fleet.config)
    rows = outbox_rows(fleet)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for topic, payload in rows:
        parsed = messages.parse_topic(PREFIX, topic)
        assert parsed is not None, topic
        assert parsed[0] == DEVICE, topic
        kinds.setdefault(parsed[1], []).append(messages.decode(parsed[1], payload, topic_device=DEVICE))
    types = [e["type"] for e in kinds["events"]]
    assert types == ["sync_started", "sync_succeeded", "drift_detected", "drift_corrected", "sync_refused",
                     "paused", "resumed"], types
    succeeded = kinds["events"][1]
    assert succeeded["detail"]["outcome"] == "applied"
    assert succeeded["detail"]["changes"] > 0
    drift = kinds["events"][2]["detail"]
    assert drift["count"] >= 1
    assert "file:/etc/motd" in drift["resources"]
    assert "drifted" not in json.dumps(drift)  # ids only, never the content found
    # the status says what differs (the drivers' short descriptions: digest, mode, owner), never content
    drifted = next(s["drift"] for s in kinds["status"] if s["drift"]["count"])
    [motd] = [r for r in drifted["resources"] if isinstance(r, dict) and r["id"] == "file:/etc/motd"]
    assert motd["expected"] != motd["found"]
    assert "sha256" in motd["expected"]
    assert "drifted" not in json.dumps(drifted)
    refused = kinds["events"][4]
    assert refused["reason"]
    assert refused["commit"] == fleet.work.head()
    assert kinds["events"][5]["reason"] == "maintenance window"
    states = [s["sync_state"] for s in kinds["status"]]
    assert states[:2] == ["in_sync", "in_sync"]
    assert "refused" in states
    assert kinds["status"][-1]["paused"] is False
    assert kinds["status"][-2]["paused"] is True
    assert all(s["release"] == 1 for s in kinds["status"])
    # every status carries the device's own labels and profile from agent.yaml
    assert all((s["labels"], s["profile"]) == ({"role": "gateway"}, "test-device") for s in kinds["status"])


def test_status_report_carries_labels_and_leaves_out_labels_beyond_the_bounds(
        caplog: pytest.LogCaptureFixture) -> None:
    now = datetime(2024, 5, 1, tzinfo=UTC)
    common: dict[str, Any] = {"commit": None, "release": None, "sync_state": "unknown", "drift": {},
                              "paused": False, "ts": now}
    msg = reporter.status_report(DEVICE, **common, labels={"site": "north"}, profile="rpi4")
    assert (msg["labels"], msg["profile"]) == ({"site": "north"}, "rpi4")
    assert "labels" not in reporter.status_report(DEVICE, **common)
    too_many = {f"k{i}": "v" for i in range(messages.MAX_LABELS + 1)}
    with caplog.at_level("WARNING", logger="edge_agent.report.build"):
        msg = reporter.status_report(DEVICE, **common, labels=too_many, profile="rpi4")
    assert "labels" not in msg  # the server keeps the labels it has; the status still goes out
    assert msg["profile"] == "rpi4"
    assert "leaves out its labels" in caplog.text


def test_reports_arrive_on_the_broker_and_decode(fleet: AgentFleet, broker: Mosquitto) -> None:
    health_release = base_release(fleet.root)
    sha = fleet.publish(health_release)
    cfg = mqtt_config(fleet, broker.port, health="300ms")
    with Subscriber(broker.port, [ALL], client_id="watcher") as sub:
        sub.wait_subscribed(1)
        agent = RunningAgent(cfg)
        try:
            assert sub.wait(has_event("sync_succeeded", sha), 20), sub.lines[-20:]
            # health reports go out from the start; wait for two that carry the installed release
            assert sub.wait(lambda s: sum(h["commit"] == sha for h in decoded(s, "health")) >= 2, 10), \
                sub.lines[-20:]
            wait_until(lambda: outbox_count(fleet) <= 2, "the outbox to drain")
        finally:
            agent.stop()
        assert sub.wait(lambda s: any(not m["online"] for m in decoded(s, "online")), 10)
    online = decoded(sub, "online")
    assert online[0]["online"] is True
    assert online[-1]["online"] is False
    status = decoded(sub, "status")[-1]
    assert (status["commit"], status["release"], status["sync_state"]) == (sha, 1, "in_sync")
    assert [r.retained for r in sub.messages(f"{PREFIX}/{DEVICE}/status")]
    assert all(
        kind_of(r.topic) in messages.DEVICE_KINDS for r in sub.messages())
    health = decoded(sub, "health")[-1]
    assert health["commit"] == sha
    assert "/" in health["metrics"]["disk"]
    assert health["metrics"]["process"]["rss"] > 0
    assert [(c["name"], c["ok"]) for c in health["checks"]] == [("true-check", True)]
    assert outbox_count(fleet) == 0
    with Subscriber(broker.port, [f"{PREFIX}/{DEVICE}/status"], client_id="late") as late:
        assert late.wait(lambda s: bool(s.messages()), 10)
        assert late.messages()[0].retained


def test_nudge_applies_a_new_release_without_waiting_for_the_poll(fleet: AgentFleet,
                                                                   broker: Mosquitto) -> None:
    first = fleet.publish(base_release(fleet.root))
    cfg = mqtt_config(fleet, broker.port, poll="1h")
    with Subscriber(broker.port, [ALL], client_id="watcher") as sub:
        sub.wait_subscribed(1)
        agent = RunningAgent(cfg)
        try:
            assert sub.wait(has_event("sync_succeeded", first), 20), sub.lines[-20:]
            time.sleep(0.2)  # the link subscribes right after announcing itself online
            second = fleet.publish({"bundles/app/files/app.conf": "listen = 2\n"})
            start = time.monotonic()
            nudge = messages.nudge_message(revision=second, release=2, ts=datetime.now(UTC))
            assert publish(broker.port, messages.nudge_topic(PREFIX), messages.encode(nudge)).returncode == 0
            assert sub.wait(has_event("sync_succeeded", second), 10), sub.lines[-20:]
            took = time.monotonic() - start
        finally:
            agent.stop()
    print(f"nudge to sync_succeeded over MQTT: {took:.3f}s")
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 2\n"
    assert took < 3.0, f"nudged apply took {took:.2f}s"


def test_desired_revision_rolls_back_and_below_the_floor_is_refused(fleet: AgentFleet,
                                                                     broker: Mosquitto) -> None:
    files = base_release(fleet.root)
    c1 = fleet.publish(files)
    c2 = fleet.publish({"bundles/app/files/app.conf": "version = 2\n"}, floor=2)
    c3 = fleet.publish({"bundles/app/files/app.conf": "version = 3\n"}, floor=2)
    conf = fleet.root / "etc/app/app.conf"
    cfg = mqtt_config(fleet, broker.port, poll="1h")
    with Subscriber(broker.port, [ALL], client_id="watcher") as sub:
        sub.wait_subscribed(1)
        agent = RunningAgent(cfg)
        try:
            assert sub.wait(has_event("sync_succeeded", c3), 20), sub.lines[-20:]
            assert conf.read_text() == "version = 3\n"
            time.sleep(0.2)
            publish_desired(broker.port, c2, 2)  # older, signed, at the floor: a rollback
            assert sub.wait(has_event("sync_succeeded", c2), 10), sub.lines[-20:]
            assert conf.read_text() == "version = 2\n"
            # The report can leave before the daemon counts the sync: count once it has.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                last = agent.daemon.last_result
                if last is not None and last.commit == c2:
                    break
                time.sleep(0.02)
            syncs = agent.daemon.syncs
            publish_desired(broker.port, c2, 2)  # the same desired again: a no-op
            time.sleep(1.0)
            assert agent.daemon.syncs == syncs
            publish_desired(broker.port, c1, 1)  # signed but below the floor: refused
            assert sub.wait(has_event("sync_refused", c1), 10), sub.lines[-20:]
            assert conf.read_text() == "version = 2\n"
        finally:
            agent.stop()
    refused = events(sub, "sync_refused")[-1]
    assert "floor" in (refused["reason"] or "")
    status = decoded(sub, "status")[-1]
    assert (status["commit"], status["release"], status["sync_state"]) == (c2, 2, "refused")


def test_reports_made_while_the_broker_is_down_arrive_in_order(fleet: AgentFleet, broker: Mosquitto) -> None:
    sha = fleet.publish(base_release(fleet.root))
    cfg = mqtt_config(fleet, broker.port)
    agent = RunningAgent(cfg)
    try:
        with Subscriber(broker.port, [ALL], client_id="watcher", persistent=True) as sub:
            sub.wait_subscribed(1)
            assert sub.wait(has_event("sync_succeeded", sha), 20), sub.lines[-20:]
        broker.stop()
        reasons = [f"outage step {i}" for i in range(6)]
        for reason in reasons:
            pause(cfg, reason)
            time.sleep(0.002)  # distinct timestamps, so that distinct reports differ byte for byte
            resume(cfg)
            time.sleep(0.002)
        time.sleep(1.0)  # the agent tries in vain meanwhile
        assert outbox_count(fleet) >= 2 * len(reasons)
        broker.start()
        with Subscriber(broker.port, [ALL], client_id="watcher", persistent=True) as sub:
            assert sub.wait(lambda s: len(events(s, "resumed")) >= len(reasons), 20), sub.lines[-20:]
            wait_until(lambda: outbox_count(fleet) == 0, "the outbox to drain")
    finally:
        agent.stop()
    raw = [r.payload for r in sub.messages(f"{PREFIX}/{DEVICE}/events")]
    unique = list(dict.fromkeys(raw))  # delivery is at least once: a resent report is byte-identical
    decoded_events = [messages.decode("events", p, topic_device=DEVICE) for p in unique]
    got = [(e["type"], e["reason"]) for e in decoded_events if e["type"] in ("paused", "resumed")]
    assert got == [x for r in reasons for x in (("paused", r), ("resumed", None))]


def test_agent_restarted_while_the_broker_is_down_still_drains(fleet: AgentFleet, broker: Mosquitto) -> None:
    sha = fleet.publish(base_release(fleet.root))
    cfg = mqtt_config(fleet, broker.port)
    with Subscriber(broker.port, [ALL], client_id="watcher", persistent=True) as sub:
        sub.wait_subscribed(1)  # a persistent session: the broker keeps what arrives while it is away
    broker.stop()
    agent = RunningAgent(cfg)
    wait_until(lambda: agent.daemon.last_result is not None, "the first sync")
    assert agent.daemon.last_result is not None
    assert agent.daemon.last_result.outcome == "applied"
    pause(cfg, "offline restart")
    agent.stop()
    assert outbox_count(fleet) >= 4
    agent = RunningAgent(cfg)  # the restarted agent, the broker still down
    try:
        time.sleep(0.5)
        broker.start()
        with Subscriber(broker.port, [ALL], client_id="watcher", persistent=True) as sub:
            wait_until(lambda: outbox_count(fleet) == 0, "the outbox to drain after the broker returned")
            assert sub.wait(has_event("paused"), 10), sub.lines[-20:]
    finally:
        agent.stop()
    types = list(dict.fromkeys(e["type"] for e in events(sub)))
    assert types == ["sync_started", "sync_succeeded", "paused"], types
    assert events(sub, "sync_succeeded")[0]["commit"] == sha
    status = decoded(sub, "status")[-1]
    assert (status["commit"], status["paused"]) == (sha, True)
