"""The store reads behind the API's hot calls, on a registry of N devices (not in ``run_all``).

    .venv/bin/python -m bench.bench_api_reads [--devices 100000] [--repeat 30] [--busy 2]

Fills a fresh SQLite store in a temporary directory with N devices (a status and an online message
each, through ``Store.apply_batch`` as the ingest writer does), then times, ``--repeat`` times
each: the first page of ``GET /api/v1/devices`` as the route builds its answer now
(``devices_page_json``: the whole JSON text from one SQL statement) and as it was built before in
Python (``devices(limit=100)`` + ``count_devices()`` + FastAPI's ``jsonable_encoder`` + JSON
encoding), a page deep in the listing, a filtered count, and ``summary()`` (what ``GET
/api/v1/summary`` recomputes at most every 2 s). Then the two first-page answers again while
``--busy`` threads keep the interpreter busy (each decoding a heartbeat's JSON in a loop, as the
MQTT network thread and the rollout runner do in the server). Prints p50 / p95 in milliseconds as
JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.encoders import jsonable_encoder

from edge_core.messages import decode, encode, health_message, online_message, status_message
from fleet_server.store import IngestBatch, Store

__all__ = ["main"]


def _fill(store: Store, count: int) -> None:
    now = time.time()
    for start in range(0, count, 5000):
        batch = IngestBatch()
        for i in range(start, min(count, start + 5000)):
            device = f"dev-{i:06d}"
            batch.add("status", status_message(device, commit="a" * 40, release=1 + (i % 3 == 0),
                                               sync_state="in_sync" if i % 7 else "drifted", drift={},
                                               paused=False, ts=now), now)
            batch.add("online", online_message(device, i % 10 != 0, now), now)
        store.apply_batch(batch)


def _time(call: Callable[[], object], repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"p50_ms": round(samples[len(samples) // 2] * 1000, 2),
            "p95_ms": round(samples[min(len(samples) - 1, round(0.95 * len(samples)) - 1)] * 1000, 2)}


def _python_page(store: Store) -> bytes:
    """The first page as the route built it before: rows decoded in Python, then encoded."""
    body = {"devices": store.devices(limit=100), "total": store.count_devices(), "limit": 100, "offset": 0}
    return json.dumps(jsonable_encoder(body), ensure_ascii=False, separators=(",", ":")).encode()


def _busy(stop: threading.Event) -> None:
    payload = encode(health_message("dev-000001", commit="a" * 40, release=1, metrics={"cpu": 0.5, "mem": 0.25, "disk": 0.1},
                                    checks=[{"name": "svc", "ok": True}], ts=time.time()))
    while not stop.is_set():
        decode("health", payload, topic_device="dev-000001")


def main(argv: Sequence[str] | None = None) -> int:
    """Fill a store, time its API reads, print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--busy", type=int, default=2, help="threads keeping the interpreter busy")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-api-reads-"))
    try:
        store = Store(work / "fleet.db")
        t0 = time.monotonic()
        _fill(store, args.devices)
        fill = time.monotonic() - t0
        out: dict[str, Any] = {"devices": store.count_devices(), "fill_seconds": round(fill, 1)}
        out["devices_first_page"] = _time(lambda: store.devices_page_json(limit=100), args.repeat)
        out["devices_first_page_python"] = _time(lambda: _python_page(store), args.repeat)
        out["devices_page_at_half"] = _time(lambda: store.devices(limit=100, offset=args.devices // 2),
                                            args.repeat)
        out["count_online"] = _time(lambda: store.count_devices(online=True), args.repeat)
        out["summary"] = _time(store.summary, args.repeat)
        sys.setswitchinterval(0.001)  # as fleet-server sets it
        stop = threading.Event()
        busy = [threading.Thread(target=_busy, args=(stop,), daemon=True) for _ in range(args.busy)]
        for thread in busy:
            thread.start()
        try:
            out[f"devices_first_page_busy_{args.busy}"] = _time(lambda: store.devices_page_json(limit=100),
                                                                args.repeat)
            out[f"devices_first_page_python_busy_{args.busy}"] = _time(lambda: _python_page(store), args.repeat)
        finally:
            stop.set()
            for thread in busy:
                thread.join(5.0)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
