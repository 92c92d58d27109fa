"""The store's ingest writer and a first devices page on both backends, in the same run: SQLite (the
default) and PostgreSQL (a throwaway local cluster, fsync off, as the tests start it; a production
server's disk makes commits slower than this).

- ingest: microseconds per message through ``apply_batch`` (batches of 500: half status, half health,
  2,000 devices), the path the MQTT writer commits;
- devices page: milliseconds for ``devices(limit=100)`` (the API's first page) over those devices.

    python -m bench.bench_store_backends [--messages 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_state_writes import BATCH, _decoded
from fleet_server.config import StoreConfig
from fleet_server.store import FleetStore, IngestBatch, open_store
from tests.support.postgres import Postgres


def _measure(store: FleetStore, docs: list[tuple[str, dict[str, Any]]]) -> dict[str, float]:
    started = time.perf_counter()
    for start in range(0, len(docs), BATCH):
        batch = IngestBatch()
        for kind, doc in docs[start:start + BATCH]:
            batch.add(kind, doc, time.time())
        store.apply_batch(batch)
    per_msg = (time.perf_counter() - started) / len(docs) * 1e6
    pages = []
    for _ in range(50):
        t0 = time.perf_counter()
        store.devices(limit=100)
        pages.append(time.perf_counter() - t0)
    return {"ingest_us_per_msg": per_msg, "devices_page_ms_p50": statistics.median(pages) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    docs = _decoded(args.messages)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as work:
        store = open_store(StoreConfig(path=Path(work) / "fleet.db"))
        try:
            results["sqlite"] = _measure(store, docs)
        finally:
            store.close()
    with Postgres() as pg:
        store = open_store(StoreConfig(url=pg.create_database(), password_file=pg.password_file))
        try:
            results["postgresql"] = _measure(store, docs)
        finally:
            store.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for backend, figures in results.items():
            print(f"{backend:10s} ingest {figures['ingest_us_per_msg']:6.1f} us/message"
                  f"  first devices page p50 {figures['devices_page_ms_p50']:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
