"""The rollout runner's incremental paths on a real SQLite store: the registry change feed,
per-device rows written only when they change, an older store's layout migrated, bounded ticks,
and reads that never wait for a tick.

Reports are ingested through ``Store.apply_batch`` (what the ingest writer commits); assignments
are recorded by the publish callable instead of going to a broker (the runner's MQTT edge).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_core.messages import online_message
from fleet_server.rollouts.engine import ReleaseRef, Start, new_rollout, step
from fleet_server.rollouts.membership import DeviceInfo
from fleet_server.rollouts.plan import parse_plan
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import FleetStore, IngestBatch, RolloutWrite, Store
from tests.support.rollout_world import NEW, OLD, ONE_WAVE, T0, Clock, fleet_of, status_of, succeeded


@pytest.fixture
def store(any_store: FleetStore) -> FleetStore:
    """A new store on each backend (SQLite, PostgreSQL)."""
    return any_store


def _runner(store: FleetStore, clock: Clock, **kwargs: Any) -> tuple[RolloutRunner, list[str]]:
    published: list[str] = []
    runner = RolloutRunner(store, lambda device, _rev, _rel, _rid: published.append(device), clock=clock,
                           **kwargs)
    runner.load()
    return runner, published


def test_registry_changes_list_only_devices_whose_rollout_fields_changed(store: FleetStore) -> None:
    fleet_of(store, 3)
    head = store.registry_change_head()
    status_of(store, ["dev-00", "dev-01"], OLD, T0)  # heartbeats: nothing the rollouts look at changed
    assert store.registry_changes(head) == []
    status_of(store, ["dev-01"], NEW, T0 + 1)
    batch = IngestBatch()
    batch.add("online", online_message("dev-02", False, T0 + 2), T0 + 2)
    store.apply_batch(batch)
    changed = store.registry_changes(head)
    assert [(r["id"], r["release"], r["online"]) for r in changed] == [("dev-01", 2, True),
                                                                      ("dev-02", 1, False)]
    assert store.registry_changes(changed[-1]["seq"]) == []
    store.register_device("dev-new", now=T0 + 3)
    assert [r["id"] for r in store.registry_changes(changed[-1]["seq"])] == ["dev-new"]


def test_a_tick_writes_only_the_device_rows_that_changed(store: FleetStore) -> None:
    devices = fleet_of(store, 20)
    clock = Clock()
    runner, published = _runner(store, clock)
    written: list[int] = []
    write_rollouts = store.write_rollouts

    def recording(write: RolloutWrite) -> None:
        written.append(len(write.devices))
        write_rollouts(write)

    store.write_rollouts = recording  # type: ignore[method-assign]
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    assert written == [20]  # a new rollout: every device once
    assert sorted(published) == devices
    clock.now += 1
    runner.tick()  # nothing reported
    clock.now += 1
    succeeded(store, ["dev-03"], clock.now)
    runner.tick()
    assert written[-1] == 1
    page = runner.devices(rid, state="applied")
    assert page is not None
    assert (page["total"], [d["id"] for d in page["devices"]]) == (1, ["dev-03"])


def test_a_tick_handles_at_most_its_budget_and_the_rest_next_tick(store: FleetStore) -> None:
    devices = fleet_of(store, 12)
    clock = Clock()
    runner, _ = _runner(store, clock, tick_budget=5)
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    clock.now += 1
    runner.tick()  # the first tick after a start reads the whole registry once
    succeeded(store, devices, clock.now + 0.5)
    applied = []
    for _ in range(4):
        clock.now += 1
        runner.tick()
        state = runner.state(rid)
        assert state is not None
        applied.append(sum(1 for s in state.devices.values() if s.state == "applied"))
    assert applied == [5, 10, 12, 12]
    assert runner.state(rid).phase == "succeeded"  # type: ignore[union-attr]


def test_a_device_reporting_its_release_in_the_registry_is_applied_the_tick_after_its_assignment(
        store: Store) -> None:
    devices = fleet_of(store, 4)
    status_of(store, devices[:1], NEW, T0 - 50)  # already runs the new release: no event will come
    clock = Clock()
    runner, _ = _runner(store, clock)
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    clock.now += 1
    runner.tick()  # full registry read: compared after its assignment
    clock.now += 1
    runner.tick()
    state = runner.state(rid)
    assert state is not None
    assert state.devices[devices[0]].state == "applied"
    assert {state.devices[d].state for d in devices[1:]} == {"assigned"}


def test_reads_are_served_while_a_tick_holds_the_runner(store: FleetStore) -> None:
    fleet_of(store, 6)
    clock = Clock()
    runner, _ = _runner(store, clock)
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    results: dict[str, Any] = {}

    def read() -> None:
        results["state"] = runner.state(rid)
        results["describe"] = runner.describe(rid, devices=False)
        results["devices"] = runner.devices(rid, offset=2, limit=3)
        results["metrics"] = runner.metrics_snapshot()
        results["live"] = runner.live_states()

    with runner._lock:  # a tick in progress
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), "a read waited for the tick"
    assert results["state"].phase == "running"
    assert "devices" not in results["describe"]
    assert results["describe"]["waves"][0]["states"] == {"assigned": 6}
    assert results["devices"]["total"] == 6
    assert [d["id"] for d in results["devices"]["devices"]] == ["dev-02", "dev-03", "dev-04"]


# The rollouts table as the previous layout created it (one JSON state per rollout, devices inside).
_OLD_ROLLOUTS = (
    "CREATE TABLE rollouts (id TEXT PRIMARY KEY, release INTEGER NOT NULL,"
    " [commit] TEXT NOT NULL, previous INTEGER, plan TEXT NOT NULL, state TEXT NOT NULL,"
    " phase TEXT NOT NULL, wave INTEGER NOT NULL,"
    " actor TEXT, reason TEXT, created REAL NOT NULL, updated REAL NOT NULL)",
    "CREATE INDEX rollouts_by_created ON rollouts (created)",
)


def test_a_store_with_the_previous_rollout_layout_loads_and_resumes(tmp_path: Path) -> None:
    plan = parse_plan(ONE_WAVE, source="t.yaml")
    fleet = [DeviceInfo(f"dev-{i:02d}", {}) for i in range(5)]
    state = new_rollout("r-old", plan, release=ReleaseRef(*NEW), previous=ReleaseRef(*OLD), devices=fleet,
                        now=T0)
    state, _ = step(state, Start(now=T0 + 1))
    conn = sqlite3.connect(tmp_path / "fleet.db")
    for statement in _OLD_ROLLOUTS:
        conn.execute(statement)
    conn.execute("INSERT INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 ("r-old", NEW[0], NEW[1], OLD[0], json.dumps(state.to_dict()["plan"]),
                  json.dumps(state.to_dict()), state.phase, state.wave, "alice", "old", T0, T0 + 1))
    conn.commit()
    conn.close()
    store = Store(tmp_path / "fleet.db")
    try:
        row = store.rollout_row("r-old")
        assert row is not None
        assert row["state"] == json.loads(json.dumps(state.to_dict()))  # the view reads as the table did
        for version, commit in (OLD, NEW):
            store.record_release(version, commit, ["ed25519:key"], T0)
        clock = Clock()
        clock.now = T0 + 10
        runner, _ = _runner(store, clock)
        loaded = runner.state("r-old")
        assert loaded == state
        assert runner.devices("r-old", state="assigned")["total"] == 5  # type: ignore[index]
        succeeded(store, ["dev-01"], clock.now)
        clock.now += 1
        runner.tick()
    finally:
        store.close()
    reopened = Store(tmp_path / "fleet.db")  # and it opens again as the new layout
    try:
        row = reopened.rollout_row("r-old")
        assert row is not None
        assert row["state"]["devices"]["dev-01"]["state"] == "applied"
    finally:
        reopened.close()


def test_reads_of_a_rollout_not_held_do_not_wait_for_a_tick(store: FleetStore) -> None:
    """The lock-free reads also hold for a rollout the runner does not hold (read from the store)."""
    fleet_of(store, 3)
    clock = Clock()
    runner, _ = _runner(store, clock)
    rid = runner.start(NEW[0], parse_plan(ONE_WAVE, source="t.yaml"), actor="t", reason="t")
    runner.act(rid, "abort", actor="t", reason="stop")
    done = threading.Event()

    def read() -> None:
        assert runner.exists(rid)
        described = runner.describe(rid)
        assert described is not None
        assert described["phase"] == "aborted"
        done.set()

    with runner._lock:
        threading.Thread(target=read, daemon=True).start()
        assert done.wait(20), "a read waited for the tick"
