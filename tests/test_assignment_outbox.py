"""The assignment outbox on both store backends: a ``desired`` assignment is marked published only
once the broker acknowledged it, so one queued but never acknowledged before a stop is published
again, the same, by the next server.

The publish callable stands in for the MQTT client at the runner's edge: it returns a handle whose
acknowledgement the test sets, as paho's message info is set by the broker's PUBACK.
"""

from __future__ import annotations

from typing import Any

import pytest

from fleet_server.rollouts.outbox import AssignmentOutbox
from fleet_server.rollouts.plan import parse_plan
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import FleetStore
from tests.support.rollout_world import NEW, ONE_WAVE, Clock, fleet_of


class Handle:
    """A publish's acknowledgement, set by the test."""

    def __init__(self) -> None:
        self.acknowledged = False
        self.failed = False

    def is_published(self) -> bool:
        if self.failed:
            raise RuntimeError("Message publish failed: the connection was lost")
        return self.acknowledged


class Broker:
    """Records every publish and hands out its acknowledgement handle."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str | None]] = []
        self.handles: dict[str, Handle] = {}

    def publish(self, device: str, _revision: str, release: int, rollout_id: str | None) -> Handle:
        self.sent.append((device, release, rollout_id))
        self.handles[device] = Handle()
        return self.handles[device]

    def acknowledge(self, *devices: str) -> None:
        for d in devices:
            self.handles[d].acknowledged = True


@pytest.fixture
def store(any_store: FleetStore) -> FleetStore:
    return any_store


def _start(store: FleetStore, clock: Clock, broker: Broker) -> tuple[RolloutRunner, str]:
    runner = RolloutRunner(store, broker.publish, clock=clock)
    runner.load()
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    return runner, rid


def _unpublished(store: FleetStore) -> list[str]:
    return [r["device"] for r in store.assignments(unpublished=True)]


def test_an_assignment_is_marked_published_only_once_acknowledged(store: FleetStore) -> None:
    devices = fleet_of(store, 4)
    clock, broker = Clock(), Broker()
    runner, rid = _start(store, clock, broker)
    assert sorted(d for d, _, _ in broker.sent) == devices
    assert _unpublished(store) == devices
    broker.acknowledge("dev-00", "dev-02")
    clock.now += 1
    runner.tick()
    assert _unpublished(store) == ["dev-01", "dev-03"]
    assert len(broker.sent) == 4  # in flight: not published a second time
    broker.acknowledge("dev-01", "dev-03")
    clock.now += 1
    runner.tick()
    assert _unpublished(store) == []
    assert {r["rollout_id"] for r in store.assignments()} == {rid}


def test_an_assignment_not_acknowledged_before_a_stop_is_published_again_the_same(store: FleetStore) -> None:
    devices = fleet_of(store, 3)
    clock, first = Clock(), Broker()
    _, rid = _start(store, clock, first)
    first.acknowledge("dev-00")
    clock.now += 1
    # the server stops here: dev-00's acknowledgement was never read, the others never came
    second = Broker()
    again = RolloutRunner(store, second.publish, clock=clock)
    assert again.load() == 1
    assert sorted(d for d, _, _ in second.sent) == devices
    assert {(release, r) for _, release, r in second.sent} == {(NEW[0], rid)}


def test_an_assignment_waiting_too_long_or_failed_is_published_again(store: FleetStore) -> None:
    fleet_of(store, 2)
    clock, broker = Clock(), Broker()
    runner, _ = _start(store, clock, broker)
    broker.handles["dev-01"].failed = True
    clock.now += 1
    runner.tick()
    assert [d for d, _, _ in broker.sent[2:]] == ["dev-01"]  # failed: published again at once
    clock.now += 58
    runner.tick()
    assert len(broker.sent) == 3
    clock.now += 2  # dev-00 has waited 61 s, the second dev-01 60 s
    runner.tick()
    assert sorted(d for d, _, _ in broker.sent[3:]) == ["dev-00", "dev-01"]
    broker.acknowledge("dev-00", "dev-01")
    clock.now += 1
    runner.tick()
    assert _unpublished(store) == []


def test_a_publisher_without_a_handle_counts_as_acknowledged(store: FleetStore) -> None:
    fleet_of(store, 2)
    sent: list[Any] = []
    outbox_runner = RolloutRunner(store, lambda *args: sent.append(args), clock=Clock())
    outbox_runner.load()
    outbox_runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    assert len(sent) == 2
    assert _unpublished(store) == []


def test_the_outbox_reports_what_is_in_flight(store: FleetStore) -> None:
    fleet_of(store, 2)
    clock, broker = Clock(), Broker()
    _start(store, clock, broker)
    outbox = AssignmentOutbox(store, broker.publish, clock)
    outbox.flush()
    assert outbox.in_flight == 2
    broker.acknowledge("dev-00", "dev-01")
    outbox.settle()
    assert outbox.in_flight == 0
    assert _unpublished(store) == []
