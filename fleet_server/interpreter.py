"""How the fleet server's processes set up the Python interpreter: thread switching and the cyclic
garbage collector.

The server process holds the rollout runner's state for every device of a rollout (a hundred
thousand frozen records and the maps that share them) for as long as it runs, and allocates fast
while a wave starts. With CPython's collector left at its defaults (thresholds 700, 10, 10) a
rollout over 100,000 devices ran 28 full collections, each 0.4-1.1 s long (timed by a
``gc.callbacks`` hook during ``python -m bench.bench_rollout --devices 100000``), every one of them
stopping every thread of the process: the API answered nothing meanwhile (p95 of ``GET
/api/v1/devices`` 570 ms, where the query itself takes 5 ms) and no report was read from the
broker. The benchmark prints how many full collections the server ran. What the server allocates
is freed by reference counting; the collector is there for the rare cycle. So:

* young collections run every 50,000 net allocations instead of 700: a temporary that lives
  through a step of the runner is freed by its reference count before a collection looks at it,
  so it is no longer promoted to the old generation (whose growth is what triggers a full pass);
* a full collection waits for 100 collections of the middle generation instead of 10 (CPython
  also waits until the objects promoted since the last full pass are a quarter of those it holds);
* what the process built while starting (modules, configuration, the FastAPI app) is frozen out of
  every collection once it serves (:func:`freeze_startup`).

``python_gc_collections_total`` of ``GET /metrics`` counts the collections of each generation.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["GC_THRESHOLDS", "SWITCH_INTERVAL", "freeze_startup", "tune_interpreter"]

SWITCH_INTERVAL = 0.001
"""Seconds a thread may hold the interpreter lock while another waits for it (default 0.005). The
HTTP threads, the ingest threads and the rollout runner share one lock, and sqlite3 gives it up
around every row it steps: with 5 ms a read of one page of devices waited up to 5 ms per row behind
a busy ingest thread (p95 0.33 s at 100,000 heartbeating devices, ``bench/bench_rollout.py``)."""

GC_THRESHOLDS = (50_000, 20, 100)
"""The collector's thresholds per generation (CPython's defaults: 700, 10, 10); see the module
docstring."""


def tune_interpreter() -> None:
    """Set the thread switch interval and the garbage collector's thresholds of this process."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup() -> None:
    """Collect once, then move every object alive now out of the reach of later collections (they
    live as long as the process)."""
    gc.collect()
    gc.freeze()
