"""Versioned schema migrations on both backends: the shipped list, `fleet-server migrate`, the
upgrade of a store that `main` wrote before migrations existed, and the refusal of a newer one.
Real SQLite files and a real PostgreSQL cluster."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from fleet_server.config import StoreConfig
from fleet_server.errors import StoreError
from fleet_server.main import main
from fleet_server.store import open_store
from fleet_server.store.copy import OWN_TABLES, TABLES
from fleet_server.store.migrations import BACKENDS, latest_version, migrations
from tests.support.postgres import Postgres
from tests.support.stores import run_sql

MAIN_DUMP = Path(__file__).parent / "data" / "fleet-db-main.sql"


def store_args(config: StoreConfig) -> list[str]:
    args = ["--set", f"store.url={config.url}"]
    if config.password_file is not None:
        args += ["--set", f"store.password_file={config.password_file}"]
    return args


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_ships_an_ordered_list_without_gaps(backend: str):
    found = migrations(backend)
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "initial"
    assert all(m.sql.strip() for m in found)


def test_both_backends_are_at_the_same_version():
    assert latest_version("sqlite") == latest_version("postgresql")


def test_a_store_main_wrote_before_migrations_is_upgraded_with_its_data(tmp_path: Path, capsys):
    db = tmp_path / "fleet.db"
    conn = sqlite3.connect(db)
    conn.executescript(MAIN_DUMP.read_text())
    conn.close()
    assert main(["--db", str(db), "migrate"]) == 0
    latest = latest_version("sqlite")
    assert capsys.readouterr().out == f"fleet database sqlite://{db}: schema 0 -> {latest}\n"
    assert main(["--db", str(db), "migrate"]) == 0
    assert capsys.readouterr().out.endswith(f"schema {latest}, up to date\n")
    store = open_store(StoreConfig(path=db))
    try:
        device = store.device("dev-1")
        assert device is not None
        assert (device["release"], device["labels"], device["sync_state"]) == (3, {"site": "x"}, "applied")
        assert [e["type"] for e in store.device_events("dev-1")] == ["sync_succeeded"]
        assert len(store.device_health("dev-1")) == 1
        assert store.counters() == {"ingested.status": 1}
        assert [r["version"] for r in store.releases()] == [3]
        assert [a["action"] for a in store.audit()] == ["enroll"]
        assert store.fleet_baseline() == (2, "b" * 40)
        assert store.rollout_cursor() == {"events": 1, "health": 1}
        row = store.rollout_row("r1")
        assert row is not None
        assert row["state"]["devices"] == {"dev-1": {"wave": 0, "state": "applied"}}
        assert [a["device"] for a in store.assignments()] == ["dev-1"]
        assert store.registry_change_head() > 0
    finally:
        store.close()
    check = sqlite3.connect(db)
    try:
        assert check.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall() \
            == [(m.version, m.name) for m in migrations("sqlite")]
        assert check.execute("SELECT term FROM leader_term").fetchall() == [(0,)]
    finally:
        check.close()


def test_migrate_creates_an_empty_postgresql_store(postgres_cluster: Postgres, capsys):
    config = StoreConfig(url=postgres_cluster.create_database(migrated=False),
                         password_file=postgres_cluster.password_file)
    assert main([*store_args(config), "migrate"]) == 0
    assert capsys.readouterr().out.endswith(f"schema 0 -> {latest_version('postgresql')}\n")
    assert main([*store_args(config), "migrate"]) == 0
    assert capsys.readouterr().out.endswith("up to date\n")


def test_a_store_written_by_a_newer_server_is_refused_in_one_line(store_config: StoreConfig, capsys):
    open_store(store_config).close()
    run_sql(store_config,
            sqlite="INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', 0)",
            postgresql="INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', 0)")
    with pytest.raises(StoreError, match="has schema 99, newer than"):
        open_store(store_config)
    assert main([*store_args(store_config), "migrate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "has schema 99, newer than" in err
    assert "Traceback" not in err


def test_both_backends_have_the_same_tables_and_columns_and_store_copy_knows_them(
        tmp_path: Path, postgres_cluster: Postgres):
    sqlite_store = open_store(StoreConfig(path=tmp_path / "fleet.db"))
    sqlite_store.close()
    conn = sqlite3.connect(tmp_path / "fleet.db")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                             " AND name NOT LIKE 'sqlite_%'")]
        on_sqlite = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        conn.close()
    url = postgres_cluster.create_database()
    with psycopg.connect(url, password=postgres_cluster.password, autocommit=True) as pg:
        rows = pg.execute("SELECT table_name, column_name FROM information_schema.columns"
                          " WHERE table_schema = 'public' AND table_name IN (SELECT table_name"
                          " FROM information_schema.tables WHERE table_schema = 'public'"
                          " AND table_type = 'BASE TABLE')"
                          " ORDER BY table_name, ordinal_position").fetchall()
    on_postgres: dict[str, list[str]] = {}
    for table, column in rows:
        on_postgres.setdefault(table, []).append(column)
    assert {t: sorted(c) for t, c in on_postgres.items()} == {t: sorted(c) for t, c in on_sqlite.items()}
    copied = {t: sorted(c) for t, c in TABLES}
    assert copied == {t: sorted(c) for t, c in on_sqlite.items() if t not in OWN_TABLES}
