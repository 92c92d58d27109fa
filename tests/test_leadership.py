"""One leader among replicas: the leader lock (a PostgreSQL session advisory lock, or the SQLite
owner's lock file), the leadership term that fences every rollout write, and the role reported by
``/healthz`` and the metrics. Real PostgreSQL, real SQLite files, real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fleet_server.config import StoreConfig
from fleet_server.errors import NotLeader, StoreError
from fleet_server.leadership import Leadership
from fleet_server.metrics import ServerMetrics
from fleet_server.store import FleetStore, RolloutWrite, open_store
from fleet_server.store.postgres.leader import LEADER_LOCK_KEY, PgLeaderLock
from fleet_server.store.sqlite.owner import SqliteLeaderLock, SqliteOwner
from tests.support.mirror import free_port
from tests.support.postgres import Postgres
from tests.support.stores import run_sql

_BOUND = 15.0
"""Seconds any wait below may take at most (generous: the lease is 1 s)."""


def _write(rollout_id: str) -> RolloutWrite:
    return RolloutWrite(rollouts=[{
        "id": rollout_id, "release": 4, "commit": "c" * 40, "previous": 3, "plan": {"waves": [1]},
        "state": {"phase": "running"}, "phase": "running", "wave": 0, "actor": "bob", "reason": "t",
        "created": 300.0, "updated": 301.0}],
        assignments=[{"device": "dev-1", "rollout_id": rollout_id, "release": 4, "commit": "c" * 40,
                      "assigned_at": 300.2}])


def _wait_for(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + _BOUND
    for _ in range(int(_BOUND / 0.05) + 1):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    pytest.fail(f"not within {_BOUND:g} s: {what}")


def test_every_rollout_write_is_refused_with_a_stale_term_and_stores_nothing(
        store_config: StoreConfig, any_store: FleetStore) -> None:
    run_sql(store_config, sqlite="UPDATE leader_term SET term = 5;",
            postgresql="UPDATE leader_term SET term = 5")
    any_store.fence(4)
    with pytest.raises(NotLeader, match=r"not the leader|term 4 is over"):
        any_store.write_rollouts(_write("stale"))
    with pytest.raises(NotLeader):
        any_store.set_fleet_baseline(3, "b" * 40)
    with pytest.raises(NotLeader):
        any_store.mark_published([("dev-1", 4, "stale")], 302.0)
    assert not any_store.rollout_exists("stale")
    assert any_store.assignments() == []
    assert any_store.fleet_baseline() is None
    any_store.fence(-1)  # not leading: refused whatever the stored term
    with pytest.raises(NotLeader):
        any_store.write_rollouts(_write("follower"))
    any_store.fence(5)
    any_store.write_rollouts(_write("current"))
    any_store.mark_published([("dev-1", 4, "current")], 302.0)
    any_store.set_fleet_baseline(3, "b" * 40)
    assert any_store.rollout_exists("current")
    assert any_store.fleet_baseline() == (3, "b" * 40)


@pytest.fixture
def pg_url(postgres_cluster: Postgres) -> str:
    return postgres_cluster.create_database()


@pytest.fixture
def pg_store(postgres_cluster: Postgres, pg_url: str) -> Iterator[FleetStore]:
    store = open_store(StoreConfig(url=pg_url, password_file=postgres_cluster.password_file))
    yield store
    store.close()


def _took(lock: PgLeaderLock, taken: list[int]) -> bool:
    term = lock.try_take()
    if term is not None:
        taken.append(term)
    return term is not None


def _lock(pg: Postgres, url: str, name: str, lease: float = 1.0) -> PgLeaderLock:
    return PgLeaderLock(url, pg.password, lease=lease, holder=name)


def test_one_replica_holds_the_lock_and_the_next_leads_with_a_higher_term_that_fences_the_first(
        postgres_cluster: Postgres, pg_url: str, pg_store: FleetStore) -> None:
    a, b = _lock(postgres_cluster, pg_url, "a"), _lock(postgres_cluster, pg_url, "b")
    try:
        term_a = a.try_take()
        assert term_a == 1
        assert b.try_take() is None  # held by a
        assert a.still_held()
        pg_store.fence(term_a)
        pg_store.write_rollouts(_write("by-a"))
        a.release()  # the session ends: PostgreSQL releases the lock (as soon as it sees the close)
        assert not a.still_held()
        taken: list[int] = []
        _wait_for(lambda: _took(b, taken), "the next replica takes the released lock")
        assert taken == [2]
        with pytest.raises(NotLeader, match="term 1 is over"):  # a, come back, cannot write any more
            pg_store.write_rollouts(_write("late-a"))
        assert not pg_store.rollout_exists("late-a")
    finally:
        a.release()
        b.release()


def test_a_paused_leader_loses_the_lock_after_one_lease(postgres_cluster: Postgres, pg_url: str,
                                                         pg_store: FleetStore) -> None:
    a, b = _lock(postgres_cluster, pg_url, "a"), _lock(postgres_cluster, pg_url, "b")
    try:
        assert a.try_take() == 1
        time.sleep(1.5)  # a makes no round trip for longer than its 1 s lease, as under SIGSTOP
        taken: list[int] = []
        _wait_for(lambda: _took(b, taken), "another replica takes the lock of a paused leader")
        assert taken == [2]
        assert not a.still_held()
    finally:
        a.release()
        b.release()


class Duties:
    """Records the leader's duties starting and stopping."""

    def __init__(self) -> None:
        self.running = False
        self.starts = 0

    def start(self) -> None:
        self.running = True
        self.starts += 1

    def stop(self) -> None:
        self.running = False


def _holder_pid(pg: Postgres, url: str) -> int | None:
    with psycopg.connect(url, password=pg.password, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                           " AND objid = %s", (LEADER_LOCK_KEY & 0xFFFFFFFF,)).fetchone()
    return None if row is None else int(row[0])


def test_a_leader_that_loses_its_lock_session_stops_at_once_and_a_follower_takes_over(
        postgres_cluster: Postgres, pg_url: str) -> None:
    config = StoreConfig(url=pg_url, password_file=postgres_cluster.password_file)
    store_a, store_b = open_store(config), open_store(config)
    duties_a, duties_b = Duties(), Duties()
    one = Leadership(_lock(postgres_cluster, pg_url, "a"), store_a, duties_a, lease=1.0)
    two = Leadership(_lock(postgres_cluster, pg_url, "b"), store_b, duties_b, lease=1.0)
    try:
        one.start()
        two.start()
        assert (one.role, two.role) == ("leader", "follower")
        assert duties_a.running
        assert not duties_b.running
        with pytest.raises(NotLeader):  # a follower's store refuses rollout writes
            store_b.write_rollouts(_write("by-follower"))
        holder = _holder_pid(postgres_cluster, pg_url)
        assert holder is not None
        with psycopg.connect(pg_url, password=postgres_cluster.password, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (holder,))
        _wait_for(lambda: one.role == "follower" and not duties_a.running, "the old leader stops leading")
        _wait_for(lambda: two.role == "leader" and duties_b.running, "the follower takes over")
        assert two.term is not None
        assert two.term > 1
        with pytest.raises(NotLeader):
            store_a.write_rollouts(_write("by-old-leader"))
        store_b.write_rollouts(_write("by-new-leader"))
    finally:
        one.stop()
        two.stop()
        store_a.close()
        store_b.close()


def test_sqlite_single_process_always_leads_with_a_new_term(tmp_path: Path) -> None:
    store = open_store(StoreConfig(path=tmp_path / "fleet.db"))
    duties = Duties()
    try:
        for expected in (1, 2):  # each start of the server is a new term
            lead = Leadership(SqliteLeaderLock(store, "me"), store, duties, lease=1.0)
            lead.start()
            assert (lead.role, lead.term, duties.running) == ("leader", expected, True)
            store.write_rollouts(_write(f"r{expected}"))
            lead.stop()
            assert (lead.role, duties.running) == ("follower", False)
            with pytest.raises(NotLeader):
                store.write_rollouts(_write("after-stop"))
    finally:
        store.close()


def test_a_second_server_on_the_same_sqlite_file_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    owner = SqliteOwner(db)
    owner.claim()
    try:
        second = SqliteOwner(db)
        with pytest.raises(StoreError, match="in use by another fleet-server"):
            second.claim()
        result = subprocess.run(  # a real second process: refused before it connects to a broker
            [sys.executable, "-m", "fleet_server.main", "--db", str(db), "--mqtt-port", "1",
             "--http-port", str(free_port())], capture_output=True, text=True, timeout=60, check=False)
    finally:
        owner.release()
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "is in use by another fleet-server" in result.stderr
    assert "Traceback" not in result.stderr
    again = SqliteOwner(db)  # released: the next server may start
    again.claim()
    again.release()


def test_the_role_gauge_says_which_store_and_role() -> None:
    metrics = ServerMetrics()
    role = ["follower"]
    metrics.attach_role("postgresql", lambda: role[0])
    text = metrics.exposition().decode()
    assert 'fleet_server_role{role="follower",store="postgresql"} 1.0' in text
    assert 'fleet_server_role{role="leader",store="postgresql"} 0.0' in text
    role[0] = "leader"
    assert 'fleet_server_role{role="leader",store="postgresql"} 1.0' in metrics.exposition().decode()
