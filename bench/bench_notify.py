"""What a notification costs the thread that reports it, and whether a hanging receiver slows ingest.

    python -m bench.bench_notify [--calls 2000] [--batches 20]

1. ``Notifier.notify`` on an SQLite store with two subscribed receivers (one transaction inserting
   two rows): p50 and p99 over ``--calls`` calls.
2. ``apply_batch`` of 1,000 events (the ingest writer's commit), p50 over ``--batches`` batches,
   before any delivery, while the delivery thread is blocked inside a receiver that does not answer
   (up to its 30 s timeout), and after the notifier stopped (the table is larger by then).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge_core.messages import event_message
from fleet_server.notify.config import Receiver
from fleet_server.notify.notifier import Notifier
from fleet_server.store import IngestBatch, Store


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _batches(store: Store, count: int, start: int) -> list[float]:
    took = []
    for b in range(count):
        batch = IngestBatch()
        now = time.time()
        for i in range(1000):
            batch.add("events", event_message(f"dev-{i:04d}", type="sync_succeeded", commit="a" * 40,
                                              release=1, ts=now + (start + b) * 1000 + i), now)
        t = time.perf_counter()
        store.apply_batch(batch)
        took.append(time.perf_counter() - t)
    return took


def main() -> None:
    """Run both measurements and print one line per figure."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    release = threading.Event()

    class Hang(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            release.wait(30.0)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    hook.daemon_threads = True
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/"
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "fleet.db")
        receivers = [Receiver(name=n, url=url, events=("*",), timeout=30.0) for n in ("a", "b")]
        notifier = Notifier(receivers, store)
        took = []
        for i in range(args.calls):
            t = time.perf_counter()
            notifier.notify("rollout.halted", {"rollout": f"r{i}", "reason": "wave 1 failed"})
            took.append(time.perf_counter() - t)
        print(f"notify (enqueue, 2 receivers, SQLite): p50 {_quantile(took, 0.5) * 1e3:.3f} ms, "
              f"p99 {_quantile(took, 0.99) * 1e3:.3f} ms over {args.calls} calls")
        quiet = _batches(store, args.batches, 0)
        notifier.start()
        time.sleep(0.5)  # the delivery thread is now inside the hanging receiver
        busy = _batches(store, args.batches, args.batches)
        release.set()
        notifier.stop()
        after = _batches(store, args.batches, 2 * args.batches)
        print(f"apply_batch of 1000 events, p50: {statistics.median(quiet) * 1e3:.1f} ms before any delivery, "
              f"{statistics.median(busy) * 1e3:.1f} ms while a delivery hangs, "
              f"{statistics.median(after) * 1e3:.1f} ms after the notifier stopped")
        store.close()
    hook.shutdown()
    hook.server_close()


if __name__ == "__main__":
    main()
