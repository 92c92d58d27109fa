"""How long an ingest batch waits behind the rollout runner's write of a wave start (not in ``run_all``).

    .venv/bin/python -m bench.bench_rollout_writes [--devices 50000] [--repeat 5]

The ingest writer and the rollout runner share the store's one write connection and its lock. When
a wave of N devices starts, the runner writes N rollout device rows and N assignments in one
transaction (``Store.write_rollouts``). This times, in a fresh SQLite store in a temporary
directory, ``--repeat`` times: that write of N devices, and meanwhile, from another thread, small
ingest batches (``Store.apply_batch`` of one status, as the ingest writer commits) one every 20 ms:
the longest any of them took is how long ingest stood still behind the write. Prints medians and
maxima in seconds as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet_server.store import IngestBatch, RolloutWrite, Store

__all__ = ["main"]

_DATA = {"wave": 2, "state": "assigned", "target": "new", "online": True, "reason": None, "since": 1.0,
         "attempts": 1, "metrics": {}, "health_failed": False, "release_seen": None}


def _wave_start(rollout_id: str, devices: int) -> RolloutWrite:
    ids = [f"dev-{i:06d}" for i in range(devices)]
    return RolloutWrite(
        devices=[{"rollout_id": rollout_id, "device": d, "wave": 2, "state": "assigned", "data": dict(_DATA)}
                 for d in ids],
        assignments=[{"device": d, "rollout_id": rollout_id, "release": 2, "commit": "2" * 40, "assigned_at": 1.0}
                     for d in ids],
        cursor={"events": 1, "health": 1})


def _one(store: Store, k: int, devices: int) -> tuple[float, float]:
    write = _wave_start(f"r{k}", devices)
    batch = IngestBatch()
    batch.add("status", {"schema": 1, "device": "dev-000000", "ts": time.time(), "release": 1}, time.time())
    waited: list[float] = []
    done = threading.Event()

    def ingest() -> None:
        while not done.wait(0.02):
            t0 = time.perf_counter()
            store.apply_batch(batch)
            waited.append(time.perf_counter() - t0)

    thread = threading.Thread(target=ingest)
    t0 = time.perf_counter()
    thread.start()
    store.write_rollouts(write)
    took = time.perf_counter() - t0
    done.set()
    thread.join(60.0)
    return took, max(waited, default=0.0)


def main(argv: Sequence[str] | None = None) -> int:
    """Time the wave-start write and an ingest batch behind it; print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-writes-"))
    try:
        store = Store(work / "fleet.db")
        runs = [_one(store, k, args.devices) for k in range(args.repeat)]
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    writes, waits = [r[0] for r in runs], [r[1] for r in runs]
    out: dict[str, Any] = {
        "devices": args.devices, "repeat": args.repeat,
        "wave_start_write_seconds": {"median": round(statistics.median(writes), 3), "max": round(max(writes), 3)},
        "longest_ingest_batch_seconds": {"median": round(statistics.median(waits), 3),
                                         "max": round(max(waits), 3)},
    }
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
