"""The fleet server's store on both backends: real SQLite files in tmp_path and real PostgreSQL
databases (``store`` is parametrised over the backends), no mocks."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

import fleet_server.store as store_mod
from fleet_server.config import StoreConfig
from fleet_server.errors import StoreError
from fleet_server.store import FleetStore, IngestBatch, Store, open_store, to_epoch
from tests.support.stores import run_sql


@pytest.fixture
def store(any_store: FleetStore) -> FleetStore:
    return any_store


def status(device: str, **kw):
    return {"schema": 1, "device": device, "ts": kw.pop("ts", 100.0), **kw}


def test_all_is_pinned():
    assert set(store_mod.__all__) == {"INGEST_KINDS", "SCHEMA_VERSION", "IngestBatch", "Received", "Store",
                                      "RolloutWrite", "to_epoch", "SqliteStore", "FleetStore", "IngestStore",
                                      "ReadStore", "RolloutStore", "AuditStore", "open_store",
                                      "read_password", "NotificationStore", "NewDelivery", "DELIVERY_STATES"}


def test_to_epoch_accepts_seconds_and_iso_text():
    assert to_epoch(12.5) == 12.5
    assert to_epoch(7) == 7.0
    assert to_epoch("1970-01-01T00:01:00Z") == 60.0
    assert to_epoch("1970-01-01T00:01:00+01:00") == -3540.0
    assert to_epoch("1970-01-01T00:01:00") is None  # no zone: ambiguous
    assert to_epoch("yesterday") is None
    assert to_epoch(True) is None
    assert to_epoch(None) is None


def test_wal_and_schema_version(tmp_path: Path):
    s = Store(tmp_path / "fleet.db")
    s.close()
    conn = sqlite3.connect(tmp_path / "fleet.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    schema = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
    assert schema == str(store_mod.SCHEMA_VERSION)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "fleet.db")


def test_unopenable_path_is_a_state_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "file" / "fleet.db")


def test_batch_upserts_devices_and_keeps_history(store: FleetStore):
    b = IngestBatch()
    b.add("status", status("d1", release=3, revision="c3", sync_state="applied", drift={"drifted": 0},
                           labels={"site": "north", "canary": "true"}, profile="pi4"), 100.0)
    b.add("online", status("d1", online=True), 100.5)
    b.add("events", status("d1", ts="1970-01-01T00:01:41Z", type="sync_succeeded", commit="c3", release=3,
                           reason=None, step=None, changes=2), 101.0)
    b.add("health", status("d2", metrics={"cpu": 12.5}, checks=[{"name": "http", "ok": True}]), 102.0)
    b.count("ingested.status")
    b.count("dropped.spoofed", 3)
    assert len(b) == 4
    store.apply_batch(b)

    d1 = store.device("d1")
    assert d1 is not None
    assert d1["labels"] == {"site": "north", "canary": "true"}
    assert (d1["release"], d1["revision"], d1["sync_state"], d1["profile"]) == (3, "c3", "applied", "pi4")
    assert d1["online"] is True
    assert d1["drift"] == {"drifted": 0}
    assert d1["last_event"] == "sync_succeeded"
    assert (d1["first_seen"], d1["last_seen"]) == (100.0, 101.0)
    d2 = store.device("d2")
    assert d2 is not None
    assert d2["sync_state"] is None
    assert d2["online"] is None
    assert store.device("nope") is None

    [ev] = store.device_events("d1")
    assert ev["type"] == "sync_succeeded"
    assert ev["ts"] == 101.0
    assert ev["received_at"] == 101.0
    assert ev["commit"] == "c3"
    assert ev["release"] == 3
    assert ev["detail"] == {"changes": 2}
    [h] = store.device_health("d2")
    assert h["metrics"] == {"cpu": 12.5}
    assert h["checks"] == [{"name": "http", "ok": True}]
    assert store.counters() == {"dropped.spoofed": 3, "ingested.status": 1}


def test_last_error_is_the_latest_refusal_or_failure_until_a_success(store: FleetStore):
    def event(kind: str, ts: float, **kw):
        return status("d1", type=kind, ts=ts, commit="c" * 40, **kw)

    b = IngestBatch()
    b.add("status", status("d1", release=1, sync_state="in_sync"), 10.0)
    b.add("events", event("sync_refused", 11.0, release=3, reason="commit is not SSH-signed"), 11.0)
    store.apply_batch(b)
    d = store.device("d1")
    assert d is not None
    assert d["last_error"] == "sync_refused (release 3): commit is not SSH-signed"
    b = IngestBatch()  # another status (no last_error in it) and an unrelated event keep it
    b.add("status", status("d1", release=1, sync_state="refused"), 12.0)
    b.add("events", event("drift_detected", 13.0, release=1), 13.0)
    store.apply_batch(b)
    assert store.device("d1")["last_error"] == "sync_refused (release 3): commit is not SSH-signed"
    b = IngestBatch()
    b.add("events", event("sync_failed", 14.0, release=4, reason="health check web failed"), 14.0)
    store.apply_batch(b)
    assert store.device("d1")["last_error"] == "sync_failed (release 4): health check web failed"
    b = IngestBatch()
    b.add("events", event("sync_succeeded", 15.0, release=4), 15.0)
    store.apply_batch(b)
    assert store.device("d1")["last_error"] is None


def test_a_repeated_failure_is_counted_on_the_device_until_a_status_without_it(store: FleetStore):
    b = IngestBatch()
    b.add("status", status("d1", release=1, sync_state="refused", repeat_count=1,
                           last_seen="2026-12-05T10:00:00Z"), 10.0)
    b.add("status", status("d1", release=1, sync_state="refused", repeat_count=12,
                           last_seen="2026-12-05T11:00:00Z"), 11.0)  # later message wins
    store.apply_batch(b)
    d = store.device("d1")
    assert d is not None
    assert (d["repeat_count"], d["repeat_last_seen"]) == (12, 1796468400.0)
    [row] = json.loads(store.devices_page_json(id_prefix="d1"))["devices"]  # the API's page, as stored
    assert (row["repeat_count"], row["repeat_last_seen"]) == (12, 1796468400.0)
    b = IngestBatch()
    b.add("status", status("d1", release=2, sync_state="in_sync"), 12.0)  # the last sync did not fail
    store.apply_batch(b)
    d = store.device("d1")
    assert d is not None
    assert (d["repeat_count"], d["repeat_last_seen"]) == (None, None)


def test_a_status_or_event_older_than_the_stored_one_does_not_overwrite_it(store: FleetStore):
    # replicas sharing the reports may commit one device's reports out of order
    b = IngestBatch()
    b.add("status", status("d1", release=2, sync_state="in_sync", ts=20.0), 21.0)
    b.add("events", status("d1", type="sync_succeeded", release=2, commit="c" * 40, ts=19.0), 21.0)
    b.add("online", status("d1", online=True, ts=18.0), 21.0)
    store.apply_batch(b)
    b = IngestBatch()  # committed later by another replica, sent earlier by the device
    b.add("status", status("d1", release=1, sync_state="failed", ts=10.0), 22.0)
    b.add("events", status("d1", type="sync_failed", release=1, commit="c" * 40, ts=9.0,
                           reason="health check web failed"), 22.0)
    b.add("online", status("d1", online=False, ts=5.0), 22.0)  # a last will: stamped when the session began
    store.apply_batch(b)
    d = store.device("d1")
    assert d is not None
    assert (d["release"], d["sync_state"], d["status_ts"]) == (2, "in_sync", 20.0)
    assert (d["last_event"], d["last_error"], d["last_event_ts"]) == ("sync_succeeded", None, 19.0)
    assert (d["online"], d["last_seen"]) == (False, 22.0)  # online has no guard; last_seen moves on
    assert sorted(e["type"] for e in store.device_events("d1")) == ["sync_failed", "sync_succeeded"]
    b = IngestBatch()
    b.add("status", status("d1", release=3, sync_state="applied", ts=30.0), 23.0)
    store.apply_batch(b)
    assert store.device("d1")["release"] == 3


def test_later_batches_update_only_what_they_carry(store: FleetStore):
    b = IngestBatch()
    b.add("status", status("d1", release=1, sync_state="applied", labels={"a": "1"}), 10.0)
    b.add("online", status("d1", online=True), 10.0)
    store.apply_batch(b)
    b = IngestBatch()
    b.add("online", status("d1", online=False), 20.0)
    b.add("status", status("d1", release=2, sync_state="failed", last_error="health check web failed"), 21.0)
    b.add("status", status("d1", release=2, sync_state="rolled_back"), 22.0)  # later message wins
    store.apply_batch(b)
    d = store.device("d1")
    assert d is not None
    assert d["online"] is False
    assert (d["release"], d["sync_state"]) == (2, "rolled_back")
    assert d["last_error"] == "health check web failed"
    assert d["labels"] == {"a": "1"}  # not in the later messages: kept
    assert (d["first_seen"], d["last_seen"]) == (10.0, 22.0)
    b = IngestBatch()
    b.count("dropped.oversized", 2)
    store.apply_batch(b)
    b.count("dropped.oversized", 0)
    store.apply_batch(IngestBatch())  # empty: nothing happens
    assert store.counters() == {"dropped.oversized": 2}


def test_batch_is_all_or_nothing(store: FleetStore, store_config: StoreConfig):
    # a real database failure in the middle of the batch: a trigger refuses health rows
    run_sql(store_config,
            sqlite="CREATE TRIGGER no_health BEFORE INSERT ON health"
                   " BEGIN SELECT RAISE(ABORT, 'no room'); END",
            postgresql="CREATE FUNCTION no_room() RETURNS trigger LANGUAGE plpgsql AS"
                       " $$ BEGIN RAISE EXCEPTION 'no room'; END $$;"
                       " CREATE TRIGGER no_health BEFORE INSERT ON health FOR EACH ROW"
                       " EXECUTE FUNCTION no_room()")
    bad = IngestBatch()
    bad.add("status", status("d2", release=1), 2.0)
    bad.add("events", status("d2", type="sync_succeeded"), 2.0)
    bad.add("health", status("d2", metrics={"x": 1}), 2.0)
    bad.count("ingested.status")
    with pytest.raises(StoreError, match=r"ingest batch.*no room"):
        store.apply_batch(bad)
    assert not store.known_device("d2")
    assert store.device_events("d2") == []
    assert store.counters() == {}
    ok = IngestBatch()
    ok.add("status", status("d2", release=1), 3.0)
    store.apply_batch(ok)  # the store is still usable
    assert store.known_device("d2")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        IngestBatch().add("desired", {"device": "d"}, 1.0)


def _fleet(store: FleetStore) -> None:
    b = IngestBatch()
    for i in range(10):
        labels = {"site": "north" if i < 4 else "south", "canary": "true" if i == 0 else "false"}
        state = "applied" if i % 3 else "failed"
        release = 5 if i < 7 else 4
        b.add("status", status(f"dev{i:02d}", release=release, sync_state=state, labels=labels), 1.0)
        b.add("online", status(f"dev{i:02d}", online=i % 2 == 0), 1.0)
    store.apply_batch(b)


def test_device_filters_and_paging(store: FleetStore):
    _fleet(store)
    ids = [d["id"] for d in store.devices()]
    assert ids == [f"dev{i:02d}" for i in range(10)]
    assert [d["id"] for d in store.devices(label={"site": "north"})] == ["dev00", "dev01", "dev02", "dev03"]
    assert [d["id"] for d in store.devices(label={"site": "north", "canary": "true"})] == ["dev00"]
    assert store.devices(label={"site": "east"}) == []
    assert store.devices(label={"site'; DROP TABLE devices; --": "x"}) == []
    assert [d["id"] for d in store.devices(sync_state="failed")] == ["dev00", "dev03", "dev06", "dev09"]
    south_online = store.devices(online=True, label={"site": "south"})
    assert [d["id"] for d in south_online] == ["dev04", "dev06", "dev08"]
    assert len(store.devices(online=False)) == 5
    assert [d["id"] for d in store.devices(limit=3, offset=8)] == ["dev08", "dev09"]
    assert store.devices(limit=-1) == []
    assert store.count_devices(label={"site": "south"}, online=True) == 3
    assert store.known_devices() == {f"dev{i:02d}" for i in range(10)}


def test_summary(store: FleetStore):
    assert store.summary() == {"devices": 0, "by_sync_state": {}, "online": 0, "offline": 0, "releases": []}
    _fleet(store)
    s = store.summary()
    assert s["devices"] == 10
    assert s["by_sync_state"] == {"applied": 6, "failed": 4}
    assert (s["online"], s["offline"]) == (5, 5)
    assert s["releases"] == [{"release": 4, "devices": 3}, {"release": 5, "devices": 7}]


def test_events_and_health_are_newest_first_and_bounded(store: FleetStore):
    b = IngestBatch()
    for i in range(20):
        b.add("events", status("d1", ts=float(i), type="drift_detected"), 100.0 + i)
        b.add("health", status("d1", ts=float(i), metrics={"i": i}), 100.0 + i)
    store.apply_batch(b)
    assert [e["ts"] for e in store.device_events("d1", limit=3)] == [19.0, 18.0, 17.0]
    assert [h["metrics"]["i"] for h in store.device_health("d1", since=15.0)] == [19, 18, 17, 16, 15]
    assert len(store.device_health("d1", limit=4)) == 4
    assert store.device_events("d2") == []


def test_git_poll_requests_are_counted(store: FleetStore):
    assert store.git_poll_requests() == 0
    store.request_git_poll()
    assert store.git_poll_requests() == 1
    store.request_git_poll()
    store.request_git_poll()
    assert store.git_poll_requests() == 3


def test_release_records_and_commit_to_applied(store: FleetStore):
    b = IngestBatch()
    b.add("events", status("d1", ts=1100.0, type="sync_succeeded", commit="aaa", release=7), 1100.0)
    store.apply_batch(b)
    assert store.commit_to_applied() == []  # commit time not known yet
    assert store.applied_from_releases() == (1, 0)
    assert store.record_release(7, "aaa", ["ed25519:k2", "ed25519:k1"], seen_at=1050.0, committed_at=1000.0)
    assert not store.record_release(7, "aaa", ["ed25519:k1"], seen_at=1060.0)
    assert store.commit_to_applied() == [100.0]  # back-filled on the stored event
    b = IngestBatch()
    b.add("events", status("d2", ts=1130.0, type="sync_succeeded", commit="aaa", release=7), 1130.0)
    b.add("events", status("d3", ts=1130.0, type="sync_succeeded", commit="zzz", release=9), 1130.0)
    store.apply_batch(b)
    assert sorted(store.commit_to_applied()) == [100.0, 130.0]
    assert store.commit_to_applied(since=1120.0) == [130.0]
    assert store.applied_from_releases() == (3, 2)
    assert store.device_events("d2")[0]["committed_at"] == 1000.0
    [rel] = store.releases()
    assert rel["version"] == 7
    assert rel["commit"] == "aaa"
    assert rel["signers"] == ["ed25519:k1", "ed25519:k2"]
    assert rel["seen_at"] == 1050.0
    assert store.event_counts() == {"sync_succeeded": 3}
    assert store.event_counts(since=1120.0) == {"sync_succeeded": 2}


def test_drift_recovery_times(store: FleetStore):
    b = IngestBatch()
    b.add("events", status("d1", ts=10.0, type="drift_detected"), 10.0)
    b.add("events", status("d1", ts=14.0, type="drift_corrected"), 14.0)
    b.add("events", status("d2", ts=20.0, type="drift_detected"), 20.0)
    b.add("events", status("d2", ts=50.0, type="drift_corrected"), 50.0)
    b.add("events", status("d3", ts=5.0, type="drift_corrected"), 5.0)  # no detection before it
    store.apply_batch(b)
    assert sorted(store.drift_recovery_times()) == [4.0, 30.0]


def test_audit_log(store: FleetStore):
    store.add_audit("alice", "rollout.pause", "rollout-7", "canary error rate", {"wave": 1}, now=5.0)
    store.add_audit("bob", "rollout.resume", "rollout-7", "fixed", now=6.0)
    entries = store.audit()
    assert [e["actor"] for e in entries] == ["bob", "alice"]
    assert entries[1] == {"id": 1, "at": 5.0, "actor": "alice", "action": "rollout.pause",
                          "target": "rollout-7", "reason": "canary error rate", "detail": {"wave": 1}}
    assert store.audit(limit=1)[0]["detail"] is None


def test_register_device(store: FleetStore):
    assert not store.known_device("new-1")
    store.register_device("new-1", labels={"site": "x"}, profile="pi4", now=3.0)
    assert store.known_device("new-1")
    d = store.device("new-1")
    assert d is not None
    assert d["registered"] is True
    assert d["labels"] == {"site": "x"}
    assert d["profile"] == "pi4"
    store.register_device("new-1", now=4.0)  # again: labels kept
    d = store.device("new-1")
    assert d is not None
    assert d["labels"] == {"site": "x"}
    assert d["first_seen"] == 3.0


def test_a_status_with_labels_and_profile_updates_the_registry_and_the_device_report_wins(store: FleetStore):
    store.register_device("gw-1", labels={"site": "registered"}, profile="generic-linux", now=1.0)
    store.register_device("gw-2", labels={"site": "north"}, now=1.0)

    def apply(*messages: dict, at: float = 10.0) -> None:
        b = IngestBatch()
        for msg in messages:
            b.add("status", msg, at)
        store.apply_batch(b)

    apply(status("gw-1", commit=None, release=None, sync_state="unknown", drift={}, paused=False,
                 labels={"site": "north", "canary": "true"}, profile="rpi4"),
          status("gw-3", commit=None, release=None, sync_state="unknown", drift={}, paused=False,
                 labels={"site": "south"}, profile="rpi4"))
    gw1 = store.device("gw-1")
    assert gw1 is not None
    assert gw1["labels"] == {"site": "north", "canary": "true"}
    assert (gw1["profile"], gw1["registered"]) == ("rpi4", True)
    assert [d["id"] for d in store.devices(label={"site": "north"})] == ["gw-1", "gw-2"]
    assert [d["id"] for d in store.devices(label={"site": "north", "canary": "true"})] == ["gw-1"]
    assert [d["id"] for d in store.devices(label={"site": "south"})] == ["gw-3"]
    snapshot = store.device_snapshot()
    assert [d["id"] for d in snapshot if d["labels"].get("site") == "north"] == ["gw-1", "gw-2"]
    # a status without the fields (an older agent) leaves labels and profile as they are
    apply(status("gw-1", commit=None, release=None, sync_state="in_sync", drift={}, paused=False), at=11.0)
    gw1 = store.device("gw-1")
    assert gw1 is not None
    assert (gw1["labels"], gw1["profile"], gw1["sync_state"]) == ({"site": "north", "canary": "true"}, "rpi4",
                                                                  "in_sync")
    # later statuses win over earlier ones in one batch, and {} clears the labels
    apply(status("gw-2", commit=None, release=None, sync_state="unknown", drift={}, paused=False,
                 labels={"site": "east"}),
          status("gw-2", commit=None, release=None, sync_state="unknown", drift={}, paused=False,
                 labels={}, profile="x86"), at=12.0)
    gw2 = store.device("gw-2")
    assert gw2 is not None
    assert (gw2["labels"], gw2["profile"]) == ({}, "x86")
    assert store.devices(label={"site": "east"}) == []
    assert store.count_devices(label={"site": "north"}) == 1


def test_prune_by_received_time(store: FleetStore):
    b = IngestBatch()
    for i in range(12000):
        b.add("health", status("d1", ts=float(i), metrics={}), float(i))
    for i in range(10):
        b.add("events", status("d1", ts=float(i), type="x"), float(i * 1000))
    store.apply_batch(b)
    deleted = store.prune(now=12000.0, events_max_age=4500.0, health_max_age=1000.0)
    assert deleted == 11000 + 8  # health received before 11000, events before 7500
    assert len(store.device_health("d1", limit=5000)) == 1000
    assert [e["ts"] for e in store.device_events("d1")] == [9.0, 8.0]
    assert store.prune(now=12000.0, events_max_age=4500.0, health_max_age=1000.0) == 0


def test_concurrent_readers_and_writer(store: FleetStore):
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                store.devices(limit=50)
                store.summary()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(20):
            b = IngestBatch()
            for i in range(200):
                b.add("status", status(f"d{i}", release=n, sync_state="applied"), float(n))
                b.add("health", status(f"d{i}", metrics={"n": n}), float(n))
            store.apply_batch(b)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert errors == []
    assert store.summary()["releases"] == [{"release": 19, "devices": 200}]


def test_batches_persist_across_reopen(store_config: StoreConfig):
    s = open_store(store_config)
    b = IngestBatch()
    b.add("status", status("d1", release=2), 1.0)
    s.apply_batch(b)
    s.close()
    s2 = open_store(store_config)
    try:
        d = s2.device("d1")
        assert d is not None
        assert d["release"] == 2
    finally:
        s2.close()


def test_redelivered_events_and_health_are_stored_once(store: FleetStore):
    for _ in range(2):
        b = IngestBatch()
        b.add("events", status("d1", ts=5.0, type="sync_failed", reason="x"), 6.0)
        b.add("health", status("d1", ts=5.0, metrics={"cpu": 1}), 6.0)
        store.apply_batch(b)
    assert len(store.device_events("d1")) == 1
    assert len(store.device_health("d1")) == 1


def test_a_message_twice_in_one_batch_is_stored_once(store: FleetStore):
    b = IngestBatch()
    for _ in range(2):
        b.add("events", status("d1", ts=5.0, type="sync_failed", reason="x"), 6.0)
        b.add("health", status("d1", ts=5.0, metrics={"cpu": 1}), 6.0)
    store.apply_batch(b)
    assert len(store.device_events("d1")) == 1
    assert len(store.device_health("d1")) == 1
