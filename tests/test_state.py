"""Tests of edge_agent.state against real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import state as state_mod
from edge_agent import state_db, state_journal, state_outbox
from edge_agent.state import Installed, Managed, StateDB
from edge_agent.state_db import SCHEMA_VERSION
from edge_agent.state_journal import JournalEntry
from edge_core.errors import StateError


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "edge-agent" / "state.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[StateDB]:
    with StateDB(db_path) as d:
        yield d


def test_all_is_pinned() -> None:
    assert set(state_mod.__all__) == {"DriftFinding", "Event", "Installed", "Managed", "StateDB"}
    assert set(state_db.__all__) == {"SCHEMA_VERSION", "Database", "dumps_json", "loads_json", "now_or"}
    assert set(state_journal.__all__) == {"TXN_OUTCOMES", "JournalEntry", "JournalTables", "OpenTxn"}
    assert set(state_outbox.__all__) == {"OUTBOX_CLASSES", "OutboxItem", "OutboxTables"}


def test_creates_private_dir_and_file_in_wal_mode(db: StateDB, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()
    assert db.schema_version() == SCHEMA_VERSION


def test_pragmas_of_the_connection(db: StateDB) -> None:
    conn = db._conn  # the pragmas are per connection: read them on the one the class uses
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -256  # KiB: the daemon's memory budget
    assert conn.isolation_level is None


def test_installed_release(db: StateDB, db_path: Path) -> None:
    assert db.installed() is None
    db.set_installed(7, "a" * 40, ["base", "web"], now=1000.5)
    assert db.installed() == Installed(7, "a" * 40, 1000.5, ("base", "web"))
    db.set_installed(8, "b" * 40, (), now=2000.0)
    db.close()
    with StateDB(db_path) as again:
        assert again.installed() == Installed(8, "b" * 40, 2000.0, ())


def test_floor_never_lowers(db: StateDB, db_path: Path) -> None:
    assert db.floor() == 0
    assert db.raise_floor(5) == 5
    assert db.raise_floor(3) == 5
    assert db.floor() == 5
    db.raise_floor(9)
    db.close()
    with StateDB(db_path) as again:
        assert again.floor() == 9


def test_trust_root(db: StateDB, db_path: Path) -> None:
    assert db.trust_root() is None
    doc = {"keys": {"k1": "00" * 32}, "threshold": 1, "version": 1}
    db.set_trust_root(doc)
    assert db.trust_root() == doc
    with pytest.raises(StateError):
        db.set_trust_root({"bad": object()})
    db.close()
    with StateDB(db_path) as again:
        assert again.trust_root() == doc


def test_managed_resources(db: StateDB, db_path: Path) -> None:
    assert db.managed() == {}
    original = {"path": "/etc/motd", "kind": "file", "mode": 420, "blob": "ab" * 32}
    m1 = Managed("file:/etc/motd", "file", {"path": "/etc/motd", "mode": 420}, "d1", original, 10.0)
    m2 = Managed("sysctl:vm.swappiness", "sysctl", {"value": "10"}, "d2", None, 11.0)
    db.update_managed([m1, m2], [])
    assert db.managed() == {m1.resource_id: m1, m2.resource_id: m2}
    m1b = Managed(m1.resource_id, "file", {"path": "/etc/motd", "mode": 384}, "d3", original, 10.0)
    db.update_managed([m1b], [m2.resource_id, "never-there"])
    db.close()
    with StateDB(db_path) as again:
        assert again.managed() == {m1.resource_id: m1b}
        assert again.backup_records() == [original]


def test_journal_lifecycle(db: StateDB, db_path: Path) -> None:
    assert db.open_txn() is None
    db.begin_txn("t1", version=3, commit="c" * 40, now=50.0)
    backup = [{"path": "/etc/a", "kind": "absent"}]
    db.journal_add("t1", 1, "file:/etc/a", "create", backup)
    db.journal_add("t1", 2, "file:/etc/b", "update", [])
    db.journal_done("t1", 1)
    db.close()
    # the agent "crashed": a new process finds the interrupted transaction
    with StateDB(db_path) as again:
        txn = again.open_txn()
        assert txn is not None
        assert (txn.txn_id, txn.version, txn.commit, txn.begun_at) == ("t1", 3, "c" * 40, 50.0)
        assert txn.entries == (
            JournalEntry(1, "file:/etc/a", "create", backup, True),
            JournalEntry(2, "file:/etc/b", "update", [], False),
        )
        assert again.backup_records() == backup
        with pytest.raises(StateError, match="still open"):
            again.begin_txn("t2", version=4, commit="d" * 40)
        again.finish_txn("t1", "rolled_back")
        again.finish_txn("t1", "rolled_back")  # same outcome again: no-op
        with pytest.raises(StateError):
            again.finish_txn("t1", "committed")
        assert again.open_txn() is None
        with pytest.raises(StateError, match="already finished"):
            again.journal_add("t1", 3, "x", "create", [])


def test_journal_errors(db: StateDB) -> None:
    with pytest.raises(StateError):
        db.journal_add("nope", 1, "x", "create", [])
    with pytest.raises(StateError):
        db.journal_done("nope", 1)
    with pytest.raises(StateError):
        db.finish_txn("nope", "committed")
    db.begin_txn("t1", version=1, commit="c")
    with pytest.raises(StateError, match="outcome"):
        db.finish_txn("t1", "exploded")
    db.journal_add("t1", 1, "x", "create", [])
    with pytest.raises(StateError, match="already exists"):
        db.journal_add("t1", 1, "y", "create", [])
    with pytest.raises(StateError):
        db.journal_add("t1", 2, "y", "create", [{"x": {1, 2}}])
    db.finish_txn("t1", "failed")
    with pytest.raises(StateError, match="already used"):
        db.begin_txn("t1", version=1, commit="c")


def test_prune_journal_keeps_the_last_finished(db: StateDB) -> None:
    for i in range(30):
        db.begin_txn(f"t{i}", version=i, commit="c")
        db.journal_add(f"t{i}", 1, "r", "create", [{"path": f"/etc/{i}", "kind": "absent"}])
        db.finish_txn(f"t{i}", "committed")
    db.begin_txn("open", version=99, commit="c")
    db.journal_add("open", 1, "r", "create", [{"path": "/etc/open", "kind": "absent"}])
    assert db.prune_journal(keep=5) == 25
    assert db.prune_journal(keep=5) == 0
    # Only the unfinished transaction's backups are still needed (finished ones cannot be undone).
    assert [r["path"] for r in db.backup_records()] == ["/etc/open"]
    txn = db.open_txn()
    assert txn is not None
    assert txn.txn_id == "open"
    assert len(txn.entries) == 1
    rows = db._conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    assert rows == 6  # the entries of pruned transactions went with them (foreign key cascade)


def test_drift_findings(db: StateDB, db_path: Path) -> None:
    db.add_drift("file:/etc/a", "sha256:aa", "sha256:bb", True, now=1.0)
    db.add_drift("sysctl:x", "1", "0", False, now=2.0)
    found = db.recent_drift()
    assert [(d.resource_id, d.expected, d.found, d.corrected, d.at) for d in found] == [
        ("sysctl:x", "1", "0", False, 2.0),
        ("file:/etc/a", "sha256:aa", "sha256:bb", True, 1.0),
    ]
    assert len(db.recent_drift(limit=1)) == 1
    db.close()
    with StateDB(db_path, max_history=3) as again:
        for i in range(5):
            again.add_drift(f"r{i}", "e", "f", False)
        assert [d.resource_id for d in again.recent_drift()] == ["r4", "r3", "r2"]


def test_events(db: StateDB) -> None:
    ids = [db.add_event("sync.started", {"commit": "c", "n": i}, now=float(i)) for i in range(3)]
    assert ids == sorted(ids)
    events = db.recent_events(2)
    assert [(e.kind, e.detail["n"], e.at) for e in events] == [
        ("sync.started", 2, 2.0),
        ("sync.started", 1, 1.0),
    ]
    with pytest.raises(StateError):
        db.add_event("bad", {"x": float("nan")})


def test_meta(db: StateDB, db_path: Path) -> None:
    assert db.get_meta("paused") is None
    db.set_meta("paused", "maintenance window")
    db.set_meta("paused", "changed reason")
    db.set_meta("last_fetch_error", "timeout")
    db.set_meta("last_fetch_error", None)
    db.set_meta("never", None)
    db.close()
    with StateDB(db_path) as again:
        assert again.get_meta("paused") == "changed reason"
        assert again.get_meta("last_fetch_error") is None


def test_outbox_order_peek_delete(db: StateDB, db_path: Path) -> None:
    ids = [
        db.outbox_put(f"fleet/v1/d1/t{i}", f"p{i}".encode(), qos=1, retain=i == 0, cls="event")
        for i in range(5)
    ]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    items = db.outbox_peek(3)
    assert [i.id for i in items] == ids[:3]
    assert items[0].payload == b"p0"
    assert items[0].retain is True
    assert items[1].retain is False
    assert (items[0].qos, items[0].cls) == (1, "event")
    assert db.outbox_delete([ids[0], ids[2], 999_999]) == 2
    assert db.outbox_delete([]) == 0
    assert db.outbox_count() == 3
    new_id = db.outbox_put("fleet/v1/d1/x", b"later", qos=0, retain=False, cls="outcome")
    assert new_id > ids[-1]
    db.close()
    with StateDB(db_path) as again:
        assert [i.id for i in again.outbox_peek(10)] == [ids[1], ids[3], ids[4], new_id]
        db_id = again.outbox_put("t", b"x", qos=1, retain=False, cls="event")
        assert db_id > new_id


def test_outbox_refuses_bad_class_and_qos(db: StateDB) -> None:
    with pytest.raises(StateError):
        db.outbox_put("t", b"x", qos=1, retain=False, cls="spam")
    with pytest.raises(StateError):
        db.outbox_put("t", b"x", qos=3, retain=False, cls="event")
    assert db.outbox_count() == 0


def _classes(db: StateDB) -> list[tuple[str, str]]:
    return [(i.cls, i.payload.decode()) for i in db.outbox_peek(1000)]


def test_outbox_drops_health_then_old_status_then_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with StateDB(tmp_path / "s.db", max_outbox=6) as db:
        db.outbox_put("o", b"o1", qos=1, retain=False, cls="outcome")
        db.outbox_put("e", b"e1", qos=1, retain=False, cls="event")
        db.outbox_put("s/a", b"sa1", qos=1, retain=True, cls="status")
        db.outbox_put("h", b"h1", qos=0, retain=False, cls="health")
        db.outbox_put("s/a", b"sa2", qos=1, retain=True, cls="status")
        db.outbox_put("h", b"h2", qos=0, retain=False, cls="health")
        assert db.outbox_count() == 6
        with caplog.at_level(logging.WARNING, logger="edge_agent.state"):
            db.outbox_put("e", b"e2", qos=1, retain=False, cls="event")  # oldest health goes
        assert _classes(db) == [
            ("outcome", "o1"),
            ("event", "e1"),
            ("status", "sa1"),
            ("status", "sa2"),
            ("health", "h2"),
            ("event", "e2"),
        ]
        assert "dropped" in caplog.text
        db.outbox_put("h", b"h3", qos=0, retain=False, cls="health")  # h2 goes (oldest health)
        db.outbox_put("h", b"h4", qos=0, retain=False, cls="health")  # h3 goes
        assert [p for c, p in _classes(db) if c == "health"] == ["h4"]
        db.outbox_put("e", b"e3", qos=1, retain=False, cls="event")  # h4 goes
        db.outbox_put("e", b"e4", qos=1, retain=False, cls="event")  # sa1 goes: not the newest of s/a
        assert _classes(db) == [
            ("outcome", "o1"),
            ("event", "e1"),
            ("status", "sa2"),
            ("event", "e2"),
            ("event", "e3"),
            ("event", "e4"),
        ]
        db.outbox_put("s/b", b"sb1", qos=1, retain=True, cls="status")  # newest per topic kept: e1 goes
        assert ("event", "e1") not in _classes(db)
        assert ("status", "sa2") in _classes(db)
        assert ("status", "sb1") in _classes(db)
        assert db.outbox_dropped() == {"health": 4, "status": 1, "event": 1}


def test_outbox_never_drops_outcomes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with StateDB(tmp_path / "s.db", max_outbox=3) as db:
        db.outbox_put("s", b"s1", qos=1, retain=True, cls="status")
        for i in range(4):
            db.outbox_put("o", f"o{i}".encode(), qos=1, retain=False, cls="outcome")
        with caplog.at_level(logging.WARNING, logger="edge_agent.state"):
            db.outbox_put("o", b"o4", qos=1, retain=False, cls="outcome")
        assert [p for c, p in _classes(db)] == ["s1", "o0", "o1", "o2", "o3", "o4"]
        assert "may not be dropped" in caplog.text
        db.outbox_put("h", b"h", qos=0, retain=False, cls="health")  # the new health item itself goes
        assert [c for c, p in _classes(db)].count("health") == 0


def test_migrations_are_idempotent_and_forward(db_path: Path) -> None:
    with StateDB(db_path) as db:
        db.set_meta("k", "v")
    with StateDB(db_path) as db:
        assert db.schema_version() == SCHEMA_VERSION
        assert db.get_meta("k") == "v"
    raw = sqlite3.connect(db_path)
    try:
        # wind the file back to schema 1: the objects of the later migrations are gone
        raw.execute("DROP INDEX outbox_by_cls")
        raw.execute("DROP INDEX txn_open")
        raw.execute("UPDATE schema_version SET version = 1")
        raw.commit()
    finally:
        raw.close()
    with StateDB(db_path) as db:
        assert db.schema_version() == SCHEMA_VERSION
        names = {r[0] for r in db._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"outbox_by_cls", "txn_open"} <= names
        assert db.get_meta("k") == "v"
        rows = db._conn.execute("SELECT count(*) FROM schema_version").fetchone()[0]
        assert rows == 1


def test_newer_schema_is_refused(db_path: Path) -> None:
    StateDB(db_path).close()
    raw = sqlite3.connect(db_path)
    try:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        raw.commit()
    finally:
        raw.close()
    with pytest.raises(StateError, match="newer"):
        StateDB(db_path)


def test_corrupt_file_is_a_state_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database at all " * 200)
    with pytest.raises(StateError, match=r"bad\.db"):
        StateDB(bad)


def test_corrupted_pages_are_a_state_error(db_path: Path) -> None:
    with StateDB(db_path) as db:
        for i in range(200):
            db.add_event("e", {"i": i, "pad": "x" * 200})
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    data = bytearray(db_path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # keep the header, wreck every page
    db_path.write_bytes(bytes(data))
    with pytest.raises(StateError), StateDB(db_path) as db:
        db.recent_events(10)


def test_unwritable_location_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError):
        StateDB(tmp_path / "file" / "state.db")


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        StateDB(tmp_path / "s.db", max_outbox=0)


def test_two_threads_share_one_db(db: StateDB) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                db.outbox_put("t", f"{n}-{i}".encode(), qos=1, retain=False, cls="event")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert db.outbox_count() == 100


def test_two_connections_see_each_others_commits(db: StateDB, db_path: Path) -> None:
    with StateDB(db_path) as other:
        db.outbox_put("t", b"x", qos=1, retain=False, cls="event")
        assert other.outbox_count() == 1
        other.set_meta("paused", "yes")
        assert db.get_meta("paused") == "yes"


def test_opening_the_database_keeps_other_connections_locks(tmp_path: Path) -> None:
    """A second StateDB in the same process must not drop the locks the first one holds (closing
    any descriptor of the file drops every POSIX lock of the process on it): while the daemon's
    connection is open, another process must not be able to take the database over."""
    path = tmp_path / "state.db"
    with StateDB(path) as first:
        first.set_meta("k", "v")  # the connection is open and holds its WAL-mode shared lock
        StateDB(path).close()
        other = subprocess.run(
            [sys.executable, "-c",
             "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0.2, isolation_level=None);"
             "print(c.execute('PRAGMA journal_mode=DELETE').fetchone()[0])", str(path)],
            capture_output=True, text=True, timeout=30, check=False)
        assert other.stdout.strip() != "delete", "another process switched the journal mode under us"
        assert first.get_meta("k") == "v"
