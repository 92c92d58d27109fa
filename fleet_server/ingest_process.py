"""One ingest process: the MQTT receive path of :mod:`fleet_server.ingest` in an OS process of its own.

``fleet-server`` starts ``ingest.processes`` of them (``python -m fleet_server.ingest_process
--index N``, see :mod:`fleet_server.ingest_supervisor`), so that decoding ~1,700 MQTT 5 messages a
second never competes for the server's interpreter lock with the rollout runner and the API. Each
one subscribes (through the shared subscription when there are several), decodes, batches into the
store and acknowledges after commit exactly as the in-process path does; the server process keeps a
publish-only client.

Talking to the server process, which started it:

* stdin: one pickled :class:`ChildSpec` (the configuration, the index, the client id and share
  group), then nothing; end of file means the server process is gone, and the ingest process stops
  (commits and acknowledges what it holds, then exits): it never outlives its parent.
* stdout: one JSON line every :data:`REPORT_INTERVAL` seconds, :meth:`RelayMetrics.report`: broker
  connection, backlog age, queue depth, and the counts and observations since the last line, which
  the server adds to its own ``/metrics``.
* stderr: the process's structured logs (inherited from the server).
* SIGTERM stops it cleanly (exit 0); SIGINT is ignored (the server process handles Ctrl-C and then
  stops its ingest processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from edge_core.errors import EdgeFleetError
from edge_core.logs import setup_logging
from fleet_server.config import ServerConfig
from fleet_server.errors import FleetError
from fleet_server.ingest import Ingestor
from fleet_server.interpreter import freeze_startup, tune_interpreter
from fleet_server.metrics import IngestMetrics
from fleet_server.store import open_store

__all__ = ["REPORT_INTERVAL", "ChildSpec", "RelayMetrics", "main"]

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.5
"""Seconds between two reports of an ingest process to the server process."""


@dataclass(frozen=True)
class ChildSpec:
    """What the server process hands one ingest process on its stdin."""

    config: ServerConfig
    index: int
    client_id: str
    share_group: str | None


class RelayMetrics(IngestMetrics):
    """The ingest collectors of an ingest process: instead of exposing them, it accumulates the
    counts and observations since the last :meth:`report`, which the server process adds to its own
    :class:`IngestMetrics` (:meth:`apply_report`)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._ingested: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._lag: list[float] = []
        self._batches: list[int] = []
        self._queue = 0
        self._commit_delay: float | None = None

    def ingested(self, kind: str, count: int = 1) -> None:
        """Count ``count`` messages of ``kind`` committed to the store."""
        with self._lock:
            self._ingested[kind] = self._ingested.get(kind, 0) + count

    def dropped(self, reason: str, count: int = 1) -> None:
        """Count ``count`` messages dropped for ``reason``."""
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + count

    def observe_lag(self, seconds: float) -> None:
        """Record one message's lag."""
        with self._lock:
            self._lag.append(round(max(0.0, seconds), 4))

    def observe_batch(self, size: int) -> None:
        """Record the size of one committed batch."""
        with self._lock:
            self._batches.append(size)

    def set_queue_depth(self, depth: int) -> None:
        """Set the number of messages waiting for the writer."""
        self._queue = depth

    def observe_commit_delay(self, seconds: float) -> None:
        """Record the receipt-to-commit time of the last batch."""
        self._commit_delay = max(0.0, seconds)

    def report(self) -> dict[str, Any]:
        """Return the report line's document and start counting afresh: the bound ingest path's
        state plus the counts and observations since the previous report."""
        with self._lock:
            doc: dict[str, Any] = {
                "connected": bool(self.broker_connected()), "backlog": self.backlog_age() or 0.0,
                "queue": self._queue, "ingested": self._ingested, "dropped": self._dropped,
                "lag": self._lag, "batches": self._batches, "commit_delay": self._commit_delay}
            self._ingested, self._dropped, self._lag, self._batches = {}, {}, [], []
            self._commit_delay = None
        return doc


def apply_report(metrics: IngestMetrics, doc: dict[str, Any]) -> None:
    """Add one ingest process's report (:meth:`RelayMetrics.report`) to the server's ``metrics``."""
    for kind, n in dict(doc.get("ingested") or {}).items():
        metrics.ingested(str(kind), int(n))
    for reason, n in dict(doc.get("dropped") or {}).items():
        metrics.dropped(str(reason), int(n))
    for seconds in doc.get("lag") or ():
        metrics.observe_lag(float(seconds))
    for size in doc.get("batches") or ():
        metrics.observe_batch(int(size))
    if doc.get("commit_delay") is not None:
        metrics.observe_commit_delay(float(doc["commit_delay"]))


def _watch_parent(stdin: IO[bytes], stop: threading.Event) -> None:
    """Set ``stop`` when the server process closes our stdin (it stopped us, or it died). Reads the
    descriptor itself: a daemon thread blocked inside the buffered reader would abort the interpreter's
    shutdown ("could not acquire lock for <stdin>")."""
    try:
        while os.read(stdin.fileno(), 4096):
            pass
    except OSError:
        pass
    stop.set()


def _write_line(out: IO[bytes], doc: dict[str, Any]) -> bool:
    try:
        out.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        out.flush()
    except (OSError, ValueError):  # the server process is gone
        return False
    return True


def serve(spec: ChildSpec, stdin: IO[bytes], out: IO[bytes]) -> None:
    """Run one ingest process until SIGTERM or the end of ``stdin``, reporting on ``out``.

    Raises:
        StoreError: the store cannot be opened.
        BrokerError: the broker settings cannot be used.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda number, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(stdin, stop), name="parent-watch", daemon=True).start()
    store = open_store(spec.config.store)
    metrics = RelayMetrics()
    ingestor = Ingestor(spec.config, store, metrics, client_id=spec.client_id, share_group=spec.share_group)
    try:
        ingestor.start()
        freeze_startup()
        log.info("ingest process %s started (client id %s, share group %s)", spec.index, spec.client_id,
                 spec.share_group)
        while not stop.wait(REPORT_INTERVAL):
            if not _write_line(out, metrics.report()):
                break
    finally:
        ingestor.stop()
        _write_line(out, metrics.report())
        store.close()
        log.info("ingest process %s stopped", spec.index)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ingest process (started by ``fleet-server``); return its exit code (0 after a clean
    stop, 1 when it cannot run)."""
    parser = argparse.ArgumentParser(prog="fleet-server-ingest",
                                     description="One MQTT ingest process of fleet-server (started by it).")
    parser.add_argument("--index", type=int, required=True, help="which of the ingest processes this is")
    args = parser.parse_args(argv)
    try:
        spec = pickle.load(sys.stdin.buffer)  # noqa: S301 - only the server process that started us writes it
    except (EOFError, pickle.UnpicklingError, OSError) as exc:
        sys.stderr.write(f"fleet-server-ingest: no configuration on stdin: {exc}\n")
        return 1
    if not isinstance(spec, ChildSpec) or spec.index != args.index:
        sys.stderr.write("fleet-server-ingest: stdin did not carry this process's configuration\n")
        return 1
    setup_logging(spec.config.log_level)
    tune_interpreter()
    try:
        serve(spec, sys.stdin.buffer, sys.stdout.buffer)
    except (EdgeFleetError, FleetError) as exc:
        log.error("ingest process %s cannot run: %s", spec.index, exc)
        return 1
    return 0


if __name__ == "__main__":  # run the imported module's main, whose ChildSpec is the one unpickled
    from fleet_server.ingest_process import main as _main

    raise SystemExit(_main())
