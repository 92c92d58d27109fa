"""What only the PostgreSQL backend has: a server that drops the store's connections, and a login
that fails. A real throwaway cluster."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from fleet_server.config import StoreConfig
from fleet_server.errors import StoreError
from fleet_server.store import IngestBatch, open_store
from tests.support.postgres import Postgres


def terminate_store_connections(pg: Postgres, url: str) -> int:
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(host="127.0.0.1", port=pg.port, user="fleet", password=pg.password,
                         dbname="postgres", autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                             " AND application_name = 'fleet-server'", (database,)).fetchall()
    return len(rows)


def test_connections_the_server_drops_are_replaced_before_use(postgres_cluster: Postgres):
    config = StoreConfig(url=postgres_cluster.create_database(), password_file=postgres_cluster.password_file)
    store = open_store(config)
    try:
        store.register_device("dev-1")
        assert store.known_device("dev-1")
        assert terminate_store_connections(postgres_cluster, config.url) >= 1
        batch = IngestBatch()
        batch.add("status", {"schema": 1, "device": "dev-2", "ts": 1.0, "release": 1}, 2.0)
        store.apply_batch(batch)  # neither the write nor the reads see a dead connection
        assert [d["id"] for d in store.devices()] == ["dev-1", "dev-2"]
        assert store.summary()["devices"] == 2
    finally:
        store.close()


def test_a_wrong_password_is_one_line_without_the_password(postgres_cluster: Postgres, tmp_path: Path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-7f3a\n")
    config = StoreConfig(url=postgres_cluster.create_database(), password_file=wrong)
    with pytest.raises(StoreError) as info:
        open_store(config)
    message = str(info.value)
    assert message.startswith(f"cannot open the fleet database {config.url}: ")
    assert "password authentication failed" in message
    assert "not-the-password-7f3a" not in message
    assert "\n" not in message
