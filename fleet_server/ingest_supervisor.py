"""Starts, watches and stops the ingest processes of ``fleet-server`` (``ingest.processes`` ≥ 1).

Each ingest process (:mod:`fleet_server.ingest_process`) is a child started with
``python -m fleet_server.ingest_process --index N``. The supervisor:

* hands each child its configuration on stdin and keeps that pipe open: when the server process
  dies, even by SIGKILL, the children read end of file and stop by themselves (no orphans);
* reads each child's report line (every 0.5 s) and adds its counts to the server's
  :class:`~fleet_server.metrics.IngestMetrics`, so ``/metrics`` and ``/healthz`` see one ingest path:
  connected when every child and the server's publish-only client are connected, backlog age the
  oldest of the children's, and a problem ``ingest process N down`` / ``not reporting`` while a
  child has exited or been silent for :data:`SILENT_AFTER` seconds;
* restarts a child that exited unasked after a backoff (1 s, doubling to 30 s; back to 1 s once a
  child ran for a minute), logging the exit code or signal, and counts the restart
  (``fleet_ingest_process_restarts_total``);
* on :meth:`IngestSupervisor.stop` sends SIGTERM to every child, waits (bounded) for them to commit,
  acknowledge and exit, and SIGKILLs one that does not.

Client ids: with one process the child uses ``mqtt.client_id`` itself (the broker keeps that
persistent session across upgrades) and the server's publish-only client ``<client_id>-publish``;
with N processes the children are ``<client_id>-0`` … ``<client_id>-(N-1)`` in the shared-subscription
group ``mqtt.share_group`` (default: the client id), so the broker splits the reports between them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from fleet_server.config import ServerConfig
from fleet_server.ingest_process import ChildSpec, apply_report
from fleet_server.metrics import IngestMetrics

__all__ = ["SILENT_AFTER", "IngestSupervisor", "child_specs", "publisher_client_id"]

log = logging.getLogger(__name__)

SILENT_AFTER = 5.0
"""Seconds without a report after which a running ingest process counts as not reporting."""
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
_STABLE_AFTER = 60.0
_WATCH_INTERVAL = 0.2


def publisher_client_id(config: ServerConfig) -> str:
    """Return the MQTT client id of the server process's publish-only client."""
    return f"{config.mqtt.client_id}-publish"


def child_specs(config: ServerConfig) -> list[ChildSpec]:
    """Return what each of the ``ingest.processes`` ingest processes is started with."""
    n = config.ingest.processes
    cid = config.mqtt.client_id
    if n == 1:
        return [ChildSpec(config, 0, cid, config.mqtt.share_group)]
    group = config.mqtt.share_group or cid
    return [ChildSpec(config, i, f"{cid}-{i}", group) for i in range(n)]


@dataclass
class _Slot:
    """One ingest process and what the supervisor knows of it (guarded by the supervisor's lock)."""

    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    next_start: float = 0.0
    failures: int = 0
    reported: float | None = None
    connected: bool = False
    backlog: float = 0.0
    queue: int = 0
    readers: list[threading.Thread] = field(default_factory=list)


class IngestSupervisor:
    """Runs the ingest processes and stands for them as the server's ingest state
    (``connected``, :meth:`backlog_age`, :meth:`problems`).

    Args:
        config: the server configuration (``ingest.processes`` children are run).
        metrics: the server's ingest collectors; the supervisor binds itself to them.
        publisher_connected: whether the server's own publish-only client is connected.
        command: the command line of one child without ``--index`` (default: this interpreter
            running ``fleet_server.ingest_process``).
        silent_after: seconds without a report after which a running child is ``not reporting``.
    """

    def __init__(self, config: ServerConfig, metrics: IngestMetrics, *,
                 publisher_connected: Callable[[], bool] = lambda: True,
                 command: list[str] | None = None, silent_after: float = SILENT_AFTER) -> None:
        self._silent_after = silent_after
        self._metrics = metrics
        self._publisher_connected = publisher_connected
        self._command = command or [sys.executable, "-m", "fleet_server.ingest_process"]
        self._slots = [_Slot(spec) for spec in child_specs(config)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- the children ----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        index = slot.spec.index
        try:
            proc = subprocess.Popen([*self._command, "--index", str(index)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=None, close_fds=True)
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.write(pickle.dumps(slot.spec))
            proc.stdin.flush()
        except OSError as exc:
            log.error("cannot start ingest process %s: %s", index, exc)
            slot.next_start = time.monotonic() + self._backoff(slot)
            return
        slot.proc, slot.started, slot.reported, slot.connected, slot.backlog = (
            proc, time.monotonic(), None, False, 0.0)
        reader = threading.Thread(target=self._read_reports, args=(slot, proc.stdout),
                                  name=f"ingest-{index}-reports", daemon=True)
        slot.readers = [reader]
        reader.start()
        log.info("ingest process %s started (pid %s)", index, proc.pid)

    def _backoff(self, slot: _Slot) -> float:
        delay: float = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2.0 ** slot.failures)
        slot.failures += 1
        return delay

    def _read_reports(self, slot: _Slot, out: IO[bytes]) -> None:
        """Read one child's report lines until its stdout closes; a bad line is logged and skipped."""
        for line in out:
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
                apply_report(self._metrics, doc)
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("ingest process %s sent an unreadable report: %s", slot.spec.index, exc)
                continue
            with self._lock:
                slot.reported = time.monotonic()
                slot.connected = bool(doc.get("connected"))
                slot.backlog = float(doc.get("backlog") or 0.0)
                slot.queue = int(doc.get("queue") or 0)
                depth = sum(s.queue for s in self._slots if s.proc is not None)
            self._metrics.set_queue_depth(depth)
        out.close()

    def _check(self, slot: _Slot, now: float) -> None:
        proc = slot.proc
        if proc is None:
            if now >= slot.next_start and not self._stop.is_set():
                self._spawn(slot)
            return
        code = proc.poll()
        if code is None:
            if slot.failures and now - slot.started >= _STABLE_AFTER:
                slot.failures = 0
            return
        if now - slot.started >= _STABLE_AFTER:
            slot.failures = 0
        delay = self._backoff(slot)
        how = f"signal {-code}" if code < 0 else f"code {code}"
        log.error("ingest process %s (pid %s) exited with %s; restarting in %g s "
                  "(its unacknowledged messages stay at the broker)", slot.spec.index, proc.pid, how, delay)
        self._metrics.process_restarts.inc()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        slot.proc, slot.connected, slot.next_start = None, False, now + delay

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_INTERVAL):
            now = time.monotonic()
            with self._lock:
                for slot in self._slots:
                    self._check(slot, now)
                up = sum(1 for s in self._slots if s.proc is not None and s.proc.poll() is None)
            self._metrics.processes_up.set(up)

    # --- the ingest state ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while every ingest process reports a broker connection and the publisher has one."""
        with self._lock:
            children = all(s.proc is not None and s.connected for s in self._slots)
        return children and self._publisher_connected()

    def backlog_age(self) -> float:
        """Return the oldest backlog age any ingest process reported, aged since its report."""
        now = time.monotonic()
        with self._lock:
            ages = [s.backlog + (now - s.reported) for s in self._slots
                    if s.proc is not None and s.reported is not None and s.backlog > 0]
        return max(ages, default=0.0)

    def problems(self) -> list[str]:
        """Return ``ingest process N down`` / ``ingest process N not reporting`` for each child in
        trouble (a child still starting counts as neither)."""
        now = time.monotonic()
        found: list[str] = []
        with self._lock:
            for s in self._slots:
                if s.proc is None or s.proc.poll() is not None:
                    found.append(f"ingest process {s.spec.index} down")
                elif now - (s.reported if s.reported is not None else s.started) > self._silent_after:
                    found.append(f"ingest process {s.spec.index} not reporting")
        return found

    def wait_connected(self, timeout: float) -> bool:
        """Wait (bounded) until every ingest process has reported a broker connection (its
        subscriptions sent); return whether they all did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(s.proc is not None and s.connected for s in self._slots):
                    return True
            time.sleep(0.05)
        return False

    def pids(self) -> list[int]:
        """Return the process ids of the running ingest processes."""
        with self._lock:
            return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.poll() is None]

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every ingest process and the watcher thread; bind to the metrics. Call once."""
        with self._lock:
            for slot in self._slots:
                self._spawn(slot)
        self._metrics.processes_up.set(len(self.pids()))
        self._metrics.bind(self)
        self._watcher = threading.Thread(target=self._watch, name="ingest-supervisor", daemon=True)
        self._watcher.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every ingest process: SIGTERM, a bounded wait for it to commit, acknowledge and exit,
        SIGKILL past ``timeout``. Idempotent."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
            self._watcher = None
        with self._lock:
            procs = [(s.spec.index, s.proc) for s in self._slots if s.proc is not None]
            readers = [r for s in self._slots for r in s.readers]
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for index, proc in procs:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("ingest process %s (pid %s) did not stop within %g s; killing it",
                          index, proc.pid, timeout)
                proc.kill()
                code = proc.wait(timeout=10.0)
            if code != 0:
                log.warning("ingest process %s (pid %s) stopped with code %s", index, proc.pid, code)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for reader in readers:
            reader.join(timeout=5.0)
        self._metrics.processes_up.set(0)
