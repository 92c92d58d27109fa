"""The devices page searched and sorted, on a registry of N devices (not in ``run_all``).

    .venv/bin/python -m bench.bench_device_sort [--devices 100000] [--repeat 20]

Fills a fresh SQLite store in a temporary directory with N devices (a status and an online message
each, through ``Store.apply_batch``, with timestamps, releases, sync states and drift counts that
vary), then times ``devices_page_json`` (what ``GET /api/v1/devices`` answers) for the first page
ordered by id, by each sort key of :data:`DEVICE_SORTS` in both directions, and searched by an id
prefix. Prints p50 / p95 in milliseconds as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_core.messages import event_message, online_message, status_message
from fleet_server.store import IngestBatch, Store
from fleet_server.store.device_order import DEVICE_SORTS

__all__ = ["main"]


def _fill(store: Store, count: int) -> None:
    now = time.time()
    for start in range(0, count, 5000):
        batch = IngestBatch()
        for i in range(start, min(count, start + 5000)):
            device = f"dev-{i:06d}"
            seen = now - (i * 7919) % count
            drift = {"count": i % 5, "corrected": False, "resources": []} if i % 11 == 0 else {}
            batch.add("status", status_message(device, commit="a" * 40, release=1 + (i % 3 == 0),
                                               sync_state="in_sync" if i % 7 else "drifted", drift=drift,
                                               paused=False, ts=seen), seen)
            batch.add("online", online_message(device, i % 10 != 0, seen), seen)
            batch.add("events", event_message(device, type="sync_succeeded", commit="a" * 40, release=1,
                                              ts=seen - 5), seen)
        store.apply_batch(batch)


def _time(call: Callable[[], object], repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"p50_ms": round(samples[len(samples) // 2] * 1000, 2),
            "p95_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))] * 1000, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    """Fill a store, time the searched and sorted first pages, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-device-sort-"))
    out: dict[str, Any] = {"devices": args.devices}
    try:
        store = Store(tmp / "fleet.db")
        _fill(store, args.devices)
        for key in DEVICE_SORTS:
            for descending in (False, True):
                name = f"sort_{key}_{'desc' if descending else 'asc'}"
                out[name] = _time(lambda k=key, d=descending: store.devices_page_json(sort=k, descending=d),
                                  args.repeat)
        out["id_prefix_dev-0421"] = _time(lambda: store.devices_page_json(id_prefix="dev-0421"), args.repeat)
        out["id_prefix_dev-0_sort_last_seen_desc"] = _time(
            lambda: store.devices_page_json(id_prefix="dev-0", sort="last_seen", descending=True), args.repeat)
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
