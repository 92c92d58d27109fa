"""The rollout runner's writes convert their rows before they take the store's write lock, which the
ingest writer waits for (a 50,000-device wave start converted inside it held ingest up for seconds).
Real SQLite in tmp_path; the probe is a value whose conversion records whether the lock is held."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.store import RolloutWrite, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "fleet.db")
    yield s
    s.close()


class _Probe:
    """An integer that records, each time it is converted, whether the store's write lock is held."""

    def __init__(self, store: Store, value: int) -> None:
        self.store, self.value, self.held = store, value, list[bool]()

    def __int__(self) -> int:
        self.held.append(self.store._write_lock.locked())
        return self.value


def test_rollout_rows_are_converted_before_the_write_lock_is_taken(store: Store) -> None:
    wave, release = _Probe(store, 2), _Probe(store, 7)
    data = {"wave": 2, "state": "assigned", "target": "new"}
    write = RolloutWrite(
        devices=[{"rollout_id": "r1", "device": f"dev{i}", "wave": wave, "state": "assigned", "data": data}
                 for i in range(3)],
        assignments=[{"device": f"dev{i}", "rollout_id": "r1", "release": release, "commit": "c" * 40,
                      "assigned_at": 1.0} for i in range(3)],
        cursor={"events": 4, "health": 5})
    store.write_rollouts(write)
    assert wave.held == [False] * 3
    assert release.held == [False] * 3
    assert store.rollout_device_rows("r1") == {f"dev{i}": data for i in range(3)}
    assert [(a["device"], a["release"], a["published_at"]) for a in store.assignments()] == \
        [(f"dev{i}", 7, None) for i in range(3)]
    assert store.rollout_cursor() == {"events": 4, "health": 5}

    published = _Probe(store, 7)
    store.mark_published([("dev0", published, "r1")], 9.0)  # type: ignore[list-item]
    assert published.held == [False]
    assert [a["published_at"] for a in store.assignments()] == [9.0, None, None]


def test_a_write_that_reads_first_waits_for_another_process_writer_instead_of_failing(tmp_path: Path) -> None:
    """Another process (an ingest process) commits while a rollout write's transaction is open, after
    its leadership-term read: the write must still succeed. With a deferred BEGIN the read's snapshot
    went stale and the write failed at once with "database is locked" (seen mid-rollout)."""
    store = Store(tmp_path / "fleet.db")
    other = sqlite3.connect(tmp_path / "fleet.db", timeout=10.0, check_same_thread=False)
    try:
        store.fence(store.take_term("replica-a", 1.0))
        check_term = store._check_term
        writer = threading.Thread(target=lambda: other.execute(
            "INSERT OR REPLACE INTO counters (name, value) VALUES ('other.process', 1)") and other.commit())

        def check_then_another_process_writes() -> None:
            check_term()  # the read inside the rollout write's transaction
            writer.start()
            writer.join(1.0)  # bounded: it commits at once unless this transaction holds the file's lock

        store._check_term = check_then_another_process_writes  # type: ignore[method-assign]
        store.write_rollouts(RolloutWrite(cursor={"events": 1, "health": 1}))
        writer.join(10.0)
        assert not writer.is_alive()
        assert store.rollout_cursor() == {"events": 1, "health": 1}
        assert other.execute("SELECT value FROM counters WHERE name = 'other.process'").fetchone() == (1,)
    finally:
        other.close()
        store.close()
