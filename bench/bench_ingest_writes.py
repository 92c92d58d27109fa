"""The ingest writer's cost per heartbeat on a large registry, with the store's SQLite settings and
with SQLite's defaults, in the same run (not in ``run_all``).

    .venv/bin/python -m bench.bench_ingest_writes [--devices 100000] [--batches 40] [--sizes 1000,5000]

Fills a fresh SQLite store in a temporary directory with N devices (a status and an online message
each, through ``Store.apply_batch``), then stores ``--batches`` batches of heartbeats of each size
(``status`` and ``health`` in turn, each from a device drawn at random, as a fleet heartbeating at a
phase of its own sends them) and times ``apply_batch`` alone: the messages are decoded before the
clock starts, as the MQTT thread decodes them before the writer takes a batch. Each size runs twice
on the same registry: with the store's settings for its write connection (a larger page cache and
fewer, larger WAL checkpoints: ``store/sqlite/connection.py``) and with SQLite's defaults
(``cache_size`` 2 MiB, ``wal_autocheckpoint`` 1,000 pages). Prints microseconds per message and
messages per second as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_api_reads import _fill
from edge_core.messages import health_message, status_message
from fleet_server.store import IngestBatch, Store

__all__ = ["main"]

_DEFAULTS = ("PRAGMA cache_size=-2000", "PRAGMA wal_autocheckpoint=1000")
"""SQLite's own settings, the reference."""


def _batches(devices: int, size: int, count: int, seed: int) -> list[IngestBatch]:
    rnd = random.Random(seed)
    out = []
    for b in range(count):
        batch = IngestBatch()
        now = time.time()
        for i in range(size):
            device = f"dev-{rnd.randrange(devices):06d}"
            if (b + i) % 2:
                message = status_message(device, commit="a" * 40, release=1, sync_state="in_sync", drift={},
                                         paused=False, ts=now)
                batch.add("status", message, now)
            else:
                message = health_message(device, commit="a" * 40, release=1, metrics={"cpu": 0.5, "mem": 0.25},
                                         checks=[{"name": "app", "ok": True}], ts=now)
                batch.add("health", message, now)
        out.append(batch)
    return out


def _time(store: Store, batches: Sequence[IngestBatch]) -> dict[str, float]:
    messages = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    for batch in batches:
        store.apply_batch(batch)
    elapsed = time.perf_counter() - t0
    return {"us_per_message": round(elapsed / messages * 1e6, 1), "messages_per_second": round(messages / elapsed)}


def main(argv: Sequence[str] | None = None) -> int:
    """Fill a store, time heartbeat batches with its settings and with SQLite's, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=100000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--sizes", default="1000,5000")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-writes-"))
    out: dict[str, Any] = {"devices": args.devices, "batches": args.batches, "runs": []}
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            for settings in ("store", "sqlite defaults"):
                db = work / f"fleet-{size}-{settings.replace(' ', '-')}.db"
                store = Store(db)
                try:
                    _fill(store, args.devices)
                    if settings != "store":
                        for pragma in _DEFAULTS:
                            store._wconn.execute(pragma)
                    batches = _batches(args.devices, size, args.batches, seed=size)
                    out["runs"].append({"batch": size, "settings": settings, **_time(store, batches)})
                finally:
                    store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
