"""Costs of the write paths tuned for the daemon's sync and the server's ingest, each beside its
reference measured in the same run:

- the ingest writer (``Store.apply_batch``, ``executemany`` on the hot tables) per message, against
  the same health rows written through sqlite-utils' ``insert_all`` into a twin database;
- marking a journal entry done (``StateDB.journal_done``, committed without its own fsync) against
  the same update committed durably (``synchronous=FULL``, as every other journal write);
- clearing stale lock files from the repository cache (``Source.clear_stale_locks``, run before
  every sync) on a clean cache.

    python -m bench.bench_state_writes [--messages 20000] [--marks 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from edge_agent.state import StateDB
from edge_core import messages as m
from edge_core.source import Source
from fleet_server.store import IngestBatch, Store

BATCH = 500


def _decoded(n: int) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i in range(n):
        dev = f"dev-{i % 2000:05d}"
        if i % 2:
            msg = m.status_message(dev, commit=None, release=i % 9, sync_state="applied", drift={},
                                   paused=False, ts=1.7e9 + i)
            out.append(("status", m.decode("status", m.encode(msg), topic_device=dev)))
        else:
            msg = m.health_message(dev, commit=None, release=1, ts=1.7e9 + i, metrics={"cpu": 12.5}, checks=[])
            out.append(("health", m.decode("health", m.encode(msg), topic_device=dev)))
    return out


def _health_db(path: Path) -> sqlite3.Connection:
    """A WAL database holding only the store's ``health`` table and its unique index."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE health (id INTEGER PRIMARY KEY, device TEXT NOT NULL, ts REAL NOT NULL,"
                 " received_at REAL NOT NULL, metrics TEXT, checks TEXT)")
    conn.execute("CREATE UNIQUE INDEX health_once ON health (device, ts)")
    return conn


def ingest_writer(work: Path, n: int) -> dict[str, float]:
    """Microseconds per message: Store.apply_batch, and health rows through sqlite-utils insert_all."""
    docs = _decoded(n)
    store = Store(work / "store.db")
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        batch = IngestBatch()
        for kind, doc in docs[start:start + BATCH]:
            batch.add(kind, doc, time.time())
        store.apply_batch(batch)
    ours = (time.perf_counter() - started) / n * 1e6
    store.close()

    health = [doc for kind, doc in docs if kind == "health"]
    db = sqlite_utils.Database(_health_db(work / "ref.db"))
    started = time.perf_counter()
    for start in range(0, len(health), BATCH):
        rows = [{"device": d["device"], "ts": float(i), "received_at": time.time(),
                 "metrics": json.dumps(d["metrics"], sort_keys=True), "checks": json.dumps(d["checks"])}
                for i, d in enumerate(health[start:start + BATCH], start)]
        with db.conn:
            db.table("health").insert_all(rows, batch_size=1000, ignore=True)
    reference = (time.perf_counter() - started) / len(health) * 1e6
    conn = _health_db(work / "ref2.db")
    started = time.perf_counter()
    for start in range(0, len(health), BATCH):
        params = [(d["device"], float(i), time.time(), json.dumps(d["metrics"], sort_keys=True),
                   json.dumps(d["checks"])) for i, d in enumerate(health[start:start + BATCH], start)]
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO health (device, ts, received_at, metrics, checks)"
                         " VALUES (?, ?, ?, ?, ?)", params)
        conn.execute("COMMIT")
    executemany = (time.perf_counter() - started) / len(health) * 1e6
    conn.close()
    return {"store_us_per_msg": ours, "health_insert_all_us_per_row": reference,
            "health_executemany_us_per_row": executemany}


def _timed(fn: Callable[[], None], runs: int = 3) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def journal_marks(work: Path, marks: int) -> dict[str, float]:
    """Milliseconds for ``marks`` done marks: journal_done, and the same update committed durably."""
    db = StateDB(work / "state.db")
    counter = [0]

    def fresh_txn() -> str:
        counter[0] += 1
        txn = f"t{counter[0]}"
        db.begin_txn(txn, version=1, commit="0" * 40)
        for seq in range(marks):
            db.journal_add(txn, seq, f"r{seq}", "update", [])
        return txn

    def ours() -> None:
        txn = fresh_txn()
        started = time.perf_counter()
        for seq in range(marks):
            db.journal_done(txn, seq)
        times.append(time.perf_counter() - started)
        db.finish_txn(txn, "committed")

    def durable() -> None:
        txn = fresh_txn()
        conn = sqlite3.connect(work / "state.db", isolation_level=None, timeout=10)
        conn.execute("PRAGMA synchronous=FULL")
        started = time.perf_counter()
        for seq in range(marks):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE journal SET done = 1 WHERE txn_id = ? AND seq = ?", (txn, seq))
            conn.execute("COMMIT")
        times.append(time.perf_counter() - started)
        conn.close()
        db.finish_txn(txn, "committed")

    times: list[float] = []
    for _ in range(3):
        ours()
    ours_ms = statistics.median(times) * 1e3
    times.clear()
    for _ in range(3):
        durable()
    durable_ms = statistics.median(times) * 1e3
    db.close()
    return {"journal_done_ms": ours_ms, "durable_marks_ms": durable_ms, "marks": marks}


def stale_locks(work: Path) -> dict[str, float]:
    """Microseconds for one clear_stale_locks on a clean cache (what every sync pays)."""
    bare = work / "mirror.git"
    cache = work / "cache"
    source = Source(str(bare), "main", cache)
    try:
        source._open_repo()  # an empty cache repository, as on a device before its first fetch
        runs = 200
        per_call = _timed(lambda: [source.clear_stale_locks() for _ in range(runs)]) / runs
    finally:
        source.close()
    return {"clear_stale_locks_us": per_call * 1e6}


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and print them (``--json``: as one JSON document)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--marks", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-state-writes-"))
    try:
        result = {**ingest_writer(work, args.messages), **journal_marks(work, args.marks), **stale_locks(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"ingest writer, Store.apply_batch: {result['store_us_per_msg']:.1f} us/message")
    print(f"  health rows alone: executemany {result['health_executemany_us_per_row']:.1f} us/row, "
          f"sqlite-utils insert_all {result['health_insert_all_us_per_row']:.1f} us/row "
          f"({result['health_insert_all_us_per_row'] / result['health_executemany_us_per_row']:.1f}x)")
    print(f"{args.marks} journal done marks: {result['journal_done_ms']:.1f} ms without their own fsync, "
          f"{result['durable_marks_ms']:.1f} ms committed durably "
          f"({result['durable_marks_ms'] / result['journal_done_ms']:.1f}x)")
    print(f"clear_stale_locks on a clean cache: {result['clear_stale_locks_us']:.0f} us per sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
