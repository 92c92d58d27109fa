"""``fleet-server store copy`` both ways between SQLite and a real PostgreSQL, on a populated store:
every row of every table arrives with its ids, the copy reads the same through the store's API,
new rows get new ids, and a destination that already holds a fleet is refused in one line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fleet_server.config import StoreConfig
from fleet_server.main import main
from fleet_server.store import FleetStore, IngestBatch, RolloutWrite, open_store
from fleet_server.store.copy import TABLES
from fleet_server.store.notification_records import NewDelivery
from tests.support.postgres import Postgres

MAIN_DUMP = Path(__file__).parent / "data" / "fleet-db-main.sql"


def populated_sqlite(path: Path) -> StoreConfig:
    """A store as main wrote it (devices, events, health, a release, a rollout, audit, baseline),
    upgraded, plus a second rollout's gates, samples and an assignment, and more history."""
    conn = sqlite3.connect(path)
    conn.executescript(MAIN_DUMP.read_text())
    conn.close()
    config = StoreConfig(path=path)
    store = open_store(config)
    try:
        batch = IngestBatch()
        for i in range(30):
            dev = f"dev-{i:02d}"
            batch.add("status", {"schema": 1, "device": dev, "ts": 200.0 + i, "release": 3,
                                 "sync_state": "applied", "labels": {"site": "b" if i % 2 else "a"},
                                 "drift": {"files": i}}, 201.0 + i)
            batch.add("events", {"schema": 1, "device": dev, "ts": 200.5 + i, "type": "sync_succeeded",
                                 "commit": "a" * 40, "release": 3, "changes": i}, 201.0 + i)
            batch.add("health", {"schema": 1, "device": dev, "ts": 200.6 + i, "metrics": {"cpu": float(i)},
                                 "checks": [{"name": "web", "ok": True}]}, 201.0 + i)
            batch.add("online", {"schema": 1, "device": dev, "ts": 199.0 + i, "online": i % 3 != 0},
                      201.0 + i)
        batch.count("ingested.status", 30)
        store.apply_batch(batch)
        store.write_rollouts(RolloutWrite(
            rollouts=[{"id": "r2", "release": 4, "commit": "c" * 40, "previous": 3, "plan": {"waves": [1]},
                       "state": {"phase": "running", "devices": None}, "phase": "running", "wave": 1,
                       "actor": "bob", "reason": "next", "created": 300.0, "updated": 301.0}],
            audit=[{"at": 300.0, "actor": "bob", "action": "start", "target": "rollout/r2", "reason": "next",
                    "detail": {"wave": 1}}],
            gates=[{"rollout_id": "r2", "wave": 0, "at": 300.5, "passed": True, "detail": {"failed": 0}}],
            assignments=[{"device": "dev-05", "rollout_id": "r2", "release": 4, "commit": "c" * 40,
                          "assigned_at": 300.2}],
            samples=[{"rollout_id": "r2", "wave": 0, "ts": 300.5, "done": 3, "failed": 0, "pending": 1,
                      "offline": 0, "deferred": 0, "skipped": 0}],
            devices=[{"rollout_id": "r2", "device": f"dev-{i:02d}", "wave": 0, "state": "applied",
                      "data": {"wave": 0, "state": "applied"}} for i in range(3)],
            cursor={"events": 5, "health": 4}))
        store.mark_published([("dev-05", 4, "r2")], 300.3)
        store.enqueue_deliveries([NewDelivery(event_id="e-1", receiver="ops", event="rollout.started",
                                              body='{"event":"rollout.started"}', created=300.4)])
    finally:
        store.close()
    return config


def table_rows(store: FleetStore) -> dict[str, list[tuple[object, ...]]]:
    out = {}
    for table, columns in TABLES:
        rows = [row for chunk in store.dump_rows(table, columns, 1000) for row in chunk]
        out[table] = sorted((r for r in rows if not (table == "meta" and r[0] == "schema")), key=repr)
    return out


def api_view(store: FleetStore) -> dict[str, object]:
    return {"devices": store.devices(), "summary": store.summary(), "counters": store.counters(),
            "events": store.device_events("dev-07"), "health": store.device_health("dev-07"),
            "releases": store.releases(), "audit": store.audit(), "rollouts": store.rollout_rows(),
            "gates": store.rollout_gates("r2"), "samples": store.rollout_samples("r2"),
            "assignments": store.assignments(), "baseline": store.fleet_baseline(),
            "cursor": store.rollout_cursor(), "changes": store.registry_changes(0),
            "heads": store.history_heads(), "snapshot": store.device_snapshot(),
            "page": store.rollout_devices_page("r2", limit=2)}


def args_of(config: StoreConfig, flag: str) -> list[str]:
    out = [f"--{flag}", config.url]
    if config.password_file is not None:
        out += [f"--{flag}-password-file", str(config.password_file)]
    return out


def copy(source: StoreConfig, dest: StoreConfig) -> int:
    return main(["store", "copy", *args_of(source, "from"), *args_of(dest, "to")])


def test_copy_sqlite_to_postgresql_and_back_keeps_every_row(tmp_path: Path, postgres_cluster: Postgres,
                                                            capsys):
    sqlite_config = populated_sqlite(tmp_path / "fleet.db")
    pg_config = StoreConfig(url=postgres_cluster.create_database(migrated=False),
                            password_file=postgres_cluster.password_file)
    assert copy(sqlite_config, pg_config) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"copied {sqlite_config.url} to {pg_config.url}: meta ")
    assert "devices 32, device_changes 32, releases 1, events 31, health 31, audit 2," in out
    back_config = StoreConfig(path=tmp_path / "back.db")
    assert copy(pg_config, back_config) == 0
    capsys.readouterr()

    stores = [open_store(c) for c in (sqlite_config, pg_config, back_config)]
    try:
        original, on_postgres, back = stores
        rows = table_rows(original)
        assert sum(len(r) for r in rows.values()) > 100  # every table holds rows
        assert all(rows.values())
        assert table_rows(on_postgres) == rows
        assert table_rows(back) == rows
        view = api_view(original)
        assert api_view(on_postgres) == view
        assert api_view(back) == view
        for store in (on_postgres, back):  # new rows get ids after the copied ones
            batch = IngestBatch()
            batch.add("events", {"schema": 1, "device": "dev-new", "ts": 500.0, "type": "sync_failed"}, 501.0)
            batch.add("status", {"schema": 1, "device": "dev-new", "ts": 500.0, "release": 4}, 501.0)
            store.apply_batch(batch)
            store.add_audit("carol", "note", "device/dev-new", "after the copy")
            assert store.history_heads()["events"] == view["heads"]["events"] + 1  # type: ignore[index]
            new_id = view["heads"]["events"] + 1  # type: ignore[index]
            assert [e["id"] for e in store.device_events("dev-new")] == [new_id]
            assert store.audit(1)[0]["id"] == 3
            assert store.registry_changes(0)[-1]["id"] == "dev-new"
            assert store.registry_change_head() > max(c["seq"] for c in view["changes"])  # type: ignore[attr-defined]
    finally:
        for store in stores:
            store.close()


def test_copy_into_a_store_that_holds_a_fleet_is_refused(tmp_path: Path, store_config: StoreConfig, capsys):
    source = populated_sqlite(tmp_path / "source.db")
    dest = open_store(store_config)
    try:
        dest.register_device("already-here")
    finally:
        dest.close()
    assert copy(source, store_config) == 1
    err = capsys.readouterr().err
    assert err == (f"fleet-server: the destination store {store_config.url} is not empty:"
                   " copy into a new database\n")
    check = open_store(store_config)
    try:
        assert [d["id"] for d in check.devices()] == ["already-here"]
    finally:
        check.close()
