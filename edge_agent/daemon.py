"""The run loop of ``edge-agent run``: sync on a timer or a nudge, check drift, stop at a safe point.

One thread does all the applying, so two applies never overlap inside the daemon; the apply lock
(``state_dir/apply.lock``) keeps a concurrent ``edge-agent sync`` out as well. A sync is two steps:
the fetch runs in a worker thread holding only the repository cache's fetch lock
(:func:`~edge_agent.prefetch.prefetch`), and when it is done the loop runs the rest of the sync
(verify, plan, apply, record) under the apply lock from the cache. A slow or hostile mirror can
hold a fetch for up to ``repo.fetch_deadline``; meanwhile drift checks and health reports go on, as
they need the apply lock but not the mirror. At most one fetch runs at a time; a nudge that arrives
during a fetch starts another sync right after this one. Timers:

* at start, undo a transaction a crash left open (before the first fetch, so drift checks that run
  while it waits on the mirror never meet a half-applied release);
* sync at start, then every ``intervals.poll``; a device with an ``mqtt`` section that has neither
  an assignment nor a fleet baseline yet first waits up to :data:`FIRST_SYNC_WAIT` seconds for the
  broker's retained ones (either wakes it), so a new device starts on the fleet's last-good release
  rather than the branch head;
  after a ``fetch_failed`` the next attempt comes after a capped exponential backoff with full
  jitter (``backoff.base`` .. ``backoff.cap``) instead, and a success resets the backoff;
* a drift check every ``intervals.drift`` (enforce: correct and record; audit: record only);
* with an ``mqtt`` section, a health report every ``intervals.health`` (the installed release's
  health checks, each bounded by its timeout, plus device metrics);
* drift checks and health reports take the installed release's desired state from the
  :class:`SyncCache` the syncs keep, as long as it holds the installed commit, instead of reading
  and parsing the release again;
* :meth:`Daemon.request_sync` (a server nudge) and :meth:`Daemon.set_desired` (a new revision the
  fleet server assigned) wake the loop at once.

With an ``mqtt`` section the daemon also runs a :class:`~edge_agent.report.service.Reporter`: the broker
link and the outbox sender (in their own threads). A ``desired`` message for a revision other than
the one followed now calls :meth:`Daemon.set_desired` (so it is synced at once, still subject to
every trust check); a repeat of the followed revision (a retained re-delivery) is a no-op. The
assigned revision is persisted in the state database, so a restart follows it from the first sync
on. The broadcast nudge calls :meth:`Daemon.request_sync`. The retained fleet baseline
(``<prefix>/_broadcast/baseline``) calls :meth:`Daemon.on_baseline`: it is persisted before the next
sync and, on a device without an assignment, wakes the loop (:mod:`edge_agent.selection` says what a
sync follows). The device's retained ``control`` message (the fleet server's remote pause) calls
:meth:`Daemon.on_control`: the loop persists it at its next safe point, and while it stands (or the
device's own pause does) nothing is applied, drift correction included. A retained ``preflight``
request calls :meth:`Daemon.on_preflight`: at its next safe point with no fetch in flight the loop
plans that release and queues the ``plan`` report (:mod:`edge_agent.preflight`). After every
operation the sender is woken to publish the reports the operation queued. Without an ``mqtt``
section reports simply wait in the outbox (``edge-agent status`` shows how many).

SIGTERM and SIGINT only set the stop event; the loop looks at it between operations, never in the
middle of an apply, so the daemon always stops at a safe point. Then the reporter sends what is
queued (for at most two seconds), publishes ``online=false`` and disconnects; a daemon that dies
without stopping leaves it to the broker's last will.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType
from typing import Any

from edge_agent.agent import (
    STATE_DB,
    DriftReport,
    SyncCache,
    SyncResult,
    assigned_revision,
    check_drift,
    recover_interrupted,
    report_health,
    set_assigned_revision,
    set_remote_pause,
    sync_once,
)
from edge_agent.backoff import Backoff
from edge_agent.config import AgentConfig
from edge_agent.errors import LockedError
from edge_agent.prefetch import Prefetched, prefetch
from edge_agent.report.service import Reporter
from edge_agent.selection import Baseline, fleet_baseline, set_fleet_baseline, target_for
from edge_core.errors import EdgeFleetError
from edge_core.logs import log_context

__all__ = ["Daemon", "install_signal_handlers", "run"]

log = logging.getLogger(__name__)

_MAX_WAIT = 0.5  # how often an idle loop looks at the stop event, in seconds
FIRST_SYNC_WAIT = 5.0
"""Seconds a device that never heard from a fleet server (no assignment, no baseline) waits for the
broker's retained ``desired`` or baseline before its first sync follows the branch head instead."""
_STOP_JOIN = 1.0  # how long a stopping daemon waits for a fetch in flight (abandoning one is safe)


class _FetchJob:
    """One fetch of ``target`` (None: the branch head) into the repository cache, in its own thread
    (no apply lock held); ``assigned`` is the assignment the sync after it follows."""

    def __init__(self, config: AgentConfig, assigned: str | None, target: str | None,
                 on_done: Callable[[], None]) -> None:
        self.assigned = assigned
        self.target = target
        self._on_done = on_done
        self.result: Prefetched | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._config = config
        self._thread = threading.Thread(target=self._run, name="edge-agent-fetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with log_context(device=self._config.device_id):
            try:
                self.result = prefetch(self._config, self.target)
            except EdgeFleetError as exc:  # a config problem: reported by the sync step
                self.error = exc
            finally:
                self._done.set()
                self._on_done()

    def done(self) -> bool:
        """Whether the fetch has finished (either way)."""
        return self._done.is_set()

    def join(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the fetch to finish."""
        self._thread.join(timeout)


class Daemon:
    """The agent's run loop; construct with a config and a stop event, then call :meth:`run`.

    Args:
        config: the validated configuration.
        stop: set it (from a signal handler or another thread) to end :meth:`run` at a safe point.
        rng: random source of the backoff jitter (seed it in tests).
        clock: monotonic clock in seconds.
        on_sync: called with every :class:`SyncResult` (the reporting module listens here).
        on_drift: called with every :class:`DriftReport` that found something.
    """

    def __init__(self, config: AgentConfig, *, stop: threading.Event, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_sync: Callable[[SyncResult], None] | None = None,
                 on_drift: Callable[[DriftReport], None] | None = None) -> None:
        self.config = config
        self.stop = stop
        self._clock = clock
        self._backoff = Backoff(base=config.backoff.base, cap=config.backoff.cap, rng=rng)
        self._wake = threading.Event()
        self._cache = SyncCache()
        self._lock = threading.Lock()
        self._want: str | None = None
        self._on_sync = on_sync
        self._on_drift = on_drift
        self._persisted_want: str | None = None
        self._baseline: Baseline | None = None
        self._persisted_baseline: Baseline | None = None
        self._reporter: Reporter | None = None
        self._job: _FetchJob | None = None
        self._nudged = False  # a sync was asked for (under _lock); _wake only wakes the loop
        self._control: str | bool | None = False  # the fleet server's pause to take (False: none)
        self._preflight: dict[str, Any] | None = None  # the latest preflight request not yet answered
        self.syncs = 0
        self.drift_checks = 0
        self.health_reports = 0
        self.last_result: SyncResult | None = None

    def request_sync(self, want: str | None = None) -> None:
        """Ask for a sync as soon as the loop is at a safe point (a nudge).

        ``want`` pins a commit as :meth:`set_desired` does; None keeps following what was assigned.
        """
        with self._lock:
            if want is not None:
                self._want = want
            self._nudged = True
        self._wake.set()

    def set_desired(self, want: str | None) -> None:
        """Follow ``want`` (the commit the fleet server assigned; None: the branch head) from now on.

        Wakes the loop for a sync at once.
        """
        with self._lock:
            self._want = want
            self._nudged = True
        self._wake.set()

    def on_desired(self, revision: str, release: int, rollout_id: str | None) -> None:
        """Handle a ``desired`` message: follow ``revision`` unless it is already followed (a repeat).

        Called from the MQTT thread; the sync itself runs in the loop.
        """
        with self._lock:
            repeat = revision == self._want
        if repeat:
            log.debug("desired revision %s (release %s) is already followed", revision, release)
            return
        log.info("fleet server assigned revision %s (release %s, rollout %s)", revision, release, rollout_id)
        self.set_desired(revision)

    def on_baseline(self, revision: str, release: int) -> None:
        """Handle the fleet baseline: remember it (persisted before the next sync); wake the loop when
        this device has no assignment of its own (an assigned device does not follow the baseline).

        Called from the MQTT thread; a repeat (a retained re-delivery) is a no-op.
        """
        baseline = Baseline(revision=revision, release=release)
        with self._lock:
            if baseline == self._baseline:
                return
            self._baseline = baseline
            assigned = self._want is not None
            if not assigned:
                self._nudged = True
        log.info("fleet baseline: release %s (%s)", release, revision)
        if not assigned:
            self._wake.set()

    def on_control(self, paused: bool, reason: str | None) -> None:
        """Handle the fleet server's ``control`` message: its pause (with ``reason``) or its lifting.

        Called from the MQTT thread; the loop persists and reports it at its next safe point.
        """
        with self._lock:
            self._control = (reason or "") if paused else None
        self._wake.set()

    def on_preflight(self, msg: dict[str, Any]) -> None:
        """Handle a ``preflight`` request: the loop plans that release and reports, at its next safe point.

        Called from the MQTT thread; only the latest request is kept.
        """
        with self._lock:
            self._preflight = dict(msg)
        self._wake.set()

    def _take_preflight(self) -> None:
        """Answer the latest preflight request, when one arrived (:mod:`edge_agent.preflight`)."""
        with self._lock:
            msg, self._preflight = self._preflight, None
        if msg is None:
            return
        from edge_agent.preflight import run_preflight  # noqa: PLC0415 - only when a rollout asks

        try:
            answered = run_preflight(self.config, revision=str(msg["revision"]),
                                     rollout_id=str(msg["rollout_id"]), requested=str(msg["ts"]),
                                     now=datetime.now().astimezone())
        except LockedError as exc:
            log.info("preflight postponed: %s", exc)
            with self._lock:
                self._preflight = self._preflight or msg
            return
        except EdgeFleetError as exc:
            log.error("preflight could not run: %s", exc)
            return
        if answered is not None:
            self._notify_reporter()

    def _take_control(self) -> None:
        """Persist and report the fleet server's pause or its lifting, when one arrived; a lifting
        that leaves the device unpaused asks for a sync, so it catches up at once."""
        with self._lock:
            control, self._control = self._control, False
        if control is False:
            return
        reason = control if isinstance(control, str) else None
        try:
            changed = set_remote_pause(self.config, reason)
        except EdgeFleetError as exc:
            log.error("cannot take the fleet server's pause: %s", exc)
            return
        if changed:
            self._notify_reporter()
            if reason is None:
                self.request_sync()

    def on_nudge(self) -> None:
        """Handle the broadcast nudge: fetch at once instead of at the next poll."""
        self.request_sync()

    def _take_nudge(self) -> bool:
        with self._lock:
            nudged, self._nudged = self._nudged, False
            return nudged

    def _take_want(self) -> str | None:
        with self._lock:
            return self._want

    def _persist_want(self, want: str | None) -> None:
        if want == self._persisted_want:
            return
        try:
            set_assigned_revision(self.config, want)
        except EdgeFleetError as exc:
            log.error("cannot persist the assigned revision: %s", exc)
            return
        self._persisted_want = want

    def _persist_baseline(self) -> None:
        with self._lock:
            baseline = self._baseline
        if baseline is None or baseline == self._persisted_baseline:
            return
        try:
            set_fleet_baseline(self.config, baseline)
        except EdgeFleetError as exc:
            log.error("cannot persist the fleet baseline: %s", exc)
            return
        self._persisted_baseline = baseline

    def _first_sync_delay(self) -> float:
        """0, or :data:`FIRST_SYNC_WAIT` when the broker may still deliver what the device should run."""
        if self._reporter is None:
            return 0.0
        with self._lock:
            if self._want is not None or self._baseline is not None:
                return 0.0
        try:
            if fleet_baseline(self.config) is not None:
                return 0.0
        except EdgeFleetError as exc:
            log.error("cannot read the fleet baseline: %s", exc)
        return min(FIRST_SYNC_WAIT, self.config.intervals.poll)

    def _load_want(self) -> None:
        try:
            stored = assigned_revision(self.config)
        except EdgeFleetError as exc:
            log.error("cannot read the assigned revision: %s", exc)
            return
        self._persisted_want = stored
        with self._lock:
            if self._want is None:
                self._want = stored

    def _notify_reporter(self) -> None:
        if self._reporter is not None:
            self._reporter.notify()

    def _start_fetch(self) -> None:
        """Start the fetch step of a sync in the worker thread."""
        want = self._take_want()
        self._persist_want(want)
        self._persist_baseline()
        try:
            target = target_for(self.config, assigned=want).revision
        except EdgeFleetError as exc:  # the sync step meets it again and reports it
            log.error("cannot read what to follow: %s", exc)
            target = want
        self._job = _FetchJob(self.config, want, target, self._wake.set)

    def _sync(self, job: _FetchJob) -> float:
        """Run the rest of a sync once ``job`` has fetched; return the seconds until the next one."""
        if job.error is not None:
            log.error("sync could not run: %s", job.error)
            return self._backoff.next_delay()
        try:
            result = sync_once(self.config, assigned=job.assigned, cache=self._cache, prefetched=job.result)
        except LockedError as exc:
            log.info("sync skipped: %s", exc)
            return min(self.config.intervals.poll, max(self.config.backoff.base, 1.0))
        except EdgeFleetError as exc:
            log.error("sync could not run: %s", exc)
            return self._backoff.next_delay()
        self.syncs += 1
        self.last_result = result
        self._notify_reporter()
        if self._on_sync is not None:
            self._on_sync(result)
        if result.outcome == "fetch_failed":
            delay = self._backoff.next_delay()
            log.info("mirror unreachable; next attempt in %.1fs", delay)
            return min(delay, self.config.intervals.poll)
        self._backoff.reset()
        return self.config.intervals.poll

    def _recover(self) -> None:
        try:
            recover_interrupted(self.config)
        except LockedError as exc:
            log.info("recovery skipped: %s (the apply holding the lock recovers first)", exc)
        except EdgeFleetError as exc:
            log.error("recovery could not run: %s (the first sync tries again)", exc)

    def _drift(self) -> None:
        try:
            report = check_drift(self.config, now=datetime.now().astimezone(), cache=self._cache)
        except LockedError as exc:
            log.info("drift check skipped: %s", exc)
            return
        except EdgeFleetError as exc:
            log.error("drift check failed: %s", exc)
            return
        self.drift_checks += 1
        self._notify_reporter()
        if report.findings and self._on_drift is not None:
            self._on_drift(report)

    def _health(self) -> None:
        try:
            report_health(self.config, cache=self._cache)
        except LockedError as exc:
            log.info("health report skipped: %s", exc)
            return
        except EdgeFleetError as exc:
            log.error("health report failed: %s", exc)
            return
        self.health_reports += 1
        self._notify_reporter()

    def _start_reporter(self) -> Reporter | None:
        """Start the broker link and outbox sender when ``mqtt`` is configured.

        Raises:
            ConfigError: the mqtt section cannot be used (e.g. an unreadable password file).
            BrokerError: the MQTT client cannot be set up (e.g. unreadable TLS files).
            StateError: the state database cannot be opened.
        """
        if self.config.mqtt is None:
            return None
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        reporter = Reporter(self.config, self.config.state_dir / STATE_DB, on_desired=self.on_desired,
                            on_nudge=self.on_nudge, on_baseline=self.on_baseline, on_control=self.on_control,
                            on_preflight=self.on_preflight)
        reporter.start()
        return reporter

    def run(self) -> None:
        """Loop until the stop event is set: sync at start, then on the timers and on request.

        Raises:
            ConfigError: the mqtt section cannot be used.
            BrokerError: the MQTT client cannot be set up.
            StateError: the state database cannot be opened for the reporter.
        """
        with log_context(device=self.config.device_id):
            log.info("agent started (mode %s, poll %ss, drift %ss)", self.config.mode,
                     self.config.intervals.poll, self.config.intervals.drift)
            self._load_want()
            self._recover()
            self._reporter = self._start_reporter()
            try:
                self._loop()
            finally:
                job, self._job = self._job, None
                if job is not None:
                    job.join(_STOP_JOIN)
                reporter, self._reporter = self._reporter, None
                if reporter is not None:
                    reporter.stop()
            log.info("agent stopped")

    def _loop(self) -> None:
        intervals = self.config.intervals
        now = self._clock()
        next_sync = now + self._first_sync_delay()
        next_drift = now + intervals.drift
        next_health = now if self._reporter is not None else float("inf")
        again = False  # a sync was asked for while a fetch was in flight
        while not self.stop.is_set():
            self._wake.clear()  # every reason to wake is a flag or a time, read after this
            self._take_control()
            if self._job is None:  # no fetch in flight: a preflight fetches too
                self._take_preflight()
            now = self._clock()
            again = self._take_nudge() or again
            job = self._job
            if job is not None and job.done():
                self._job = None
                delay = self._sync(job)  # the wait counts from the end of the attempt, not its start
                next_sync = now if again else self._clock() + delay
                again = False
                continue
            if job is None and (again or now >= next_sync):
                again = False
                self._start_fetch()
                continue
            if now >= next_drift:
                self._drift()
                next_drift = self._clock() + intervals.drift
                continue
            if now >= next_health:
                self._health()
                next_health = self._clock() + intervals.health
                continue
            until_sync = next_sync - now if job is None else _MAX_WAIT
            self._wake.wait(max(0.0, min(until_sync, next_drift - now, next_health - now, _MAX_WAIT)))

def run(config: AgentConfig, *, stop: threading.Event) -> None:
    """Run the agent until ``stop`` is set (see :class:`Daemon`)."""
    Daemon(config, stop=stop).run()


def install_signal_handlers(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT set ``stop`` (the loop then ends at its next safe point)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s received; stopping at the next safe point", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
