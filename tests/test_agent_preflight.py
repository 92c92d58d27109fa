"""A device's side of a preflight end to end: a real agent daemon (a real `git daemon` mirror, signed
releases, a tmp root) takes the fleet server's ``preflight`` request from a real Mosquitto, plans the
release against its live state, applies nothing, and answers with a ``plan`` report once per request."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from edge_core import messages
from edge_core.preflight_messages import preflight_message
from tests.support.agent_fleet import AgentFleet, base_release
from tests.support.agent_mqtt import DEVICE, PREFIX, RunningAgent, has_event, mqtt_config
from tests.support.broker import Mosquitto, Subscriber, publish

PLANS = f"{PREFIX}/{DEVICE}/plan"


def ask(port: int, revision: str, release: int, rollout_id: str) -> None:
    msg = preflight_message(DEVICE, revision=revision, release=release, rollout_id=rollout_id,
                            ts=datetime.now(UTC))
    proc = publish(port, f"{PREFIX}/{DEVICE}/preflight", messages.encode(msg), retain=True)
    assert proc.returncode == 0, proc.stderr


def plans(sub: Subscriber) -> list[dict[str, object]]:
    return [messages.decode("plan", r.payload, topic_device=DEVICE) for r in sub.messages(PLANS)]


def test_a_device_plans_the_asked_release_applies_nothing_and_answers_each_request_once(
        fleet: AgentFleet, tmp_path: Path) -> None:
    first = fleet.publish(base_release(fleet.root))
    with Mosquitto(tmp_path / "broker") as broker:
        cfg = mqtt_config(fleet, broker.port, poll="1h")
        with Subscriber(broker.port, [f"{PREFIX}/{DEVICE}/#"], client_id="watcher") as sub:
            sub.wait_subscribed(1)
            agent = RunningAgent(cfg)
            try:
                assert sub.wait(has_event("sync_succeeded", first), 20), sub.lines[-20:]
                second = fleet.publish({"bundles/app/files/app.conf": "listen = 2\n"})
                ask(broker.port, second, 2, "r-1")
                assert sub.wait(lambda s: len(plans(s)) >= 1, 20), sub.lines[-20:]
                [plan] = plans(sub)
                assert (plan["rollout_id"], plan["outcome"], plan["commit"], plan["release"]) == (
                    "r-1", "change", second, 2)
                assert plan["changes"] == {"file": 1}
                assert (plan["prune"], plan["reason"]) == (0, None)
                assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 8443\nupstream = one\n"
                # a tampered head: the device would refuse it, and says why
                tampered = fleet.push_unsigned({"bundles/app/files/app.conf": "evil\n"})
                ask(broker.port, tampered, 3, "r-2")
                assert sub.wait(lambda s: len(plans(s)) >= 2, 20), sub.lines[-20:]
                refused = plans(sub)[-1]
                assert (refused["rollout_id"], refused["outcome"]) == ("r-2", "refused")
                assert refused["reason"]
                assert agent.daemon.last_result is not None
                assert agent.daemon.last_result.commit == first  # nothing was applied meanwhile
            finally:
                agent.stop()
        # restarted: the retained request of r-2 comes again and is not answered twice
        with Subscriber(broker.port, [PLANS], client_id="watcher-2") as again:
            again.wait_subscribed(1)
            agent = RunningAgent(cfg)
            try:
                assert not again.wait(lambda s: len(plans(s)) >= 1, 3)
            finally:
                agent.stop()
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 8443\nupstream = one\n"
