"""Prometheus metrics of the fleet server, each on a registry the caller owns (no global registry).

Four groups (described in ``docs/metrics.md``; the rollout metrics in ``docs/rollouts.md``):

* :class:`IngestMetrics` — counters, histograms and gauges the MQTT ingest path updates as it works,
  plus the ingest state read at scrape time once an ingest path is bound (backlog age, broker
  connection), which ``/healthz`` reads too.
* :class:`ReleaseMetrics` — what the Git watcher saw: polls, verified and refused releases.
* :class:`FleetCollector` — computed at scrape time from the store: devices by sync state and online,
  and the GitOps service levels. The store computes the aggregates in SQL; the pure
  :func:`service_levels` turns them into rates.
* :class:`RolloutCollector` — computed at scrape time from the rollout runner: phase, current wave,
  devices by state per wave, gate evaluations per wave.

:class:`ServerMetrics` bundles the three on one :class:`CollectorRegistry` and renders the
Prometheus text exposition for ``GET /metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet_server.errors import StoreError
from fleet_server.metrics_role import RoleCollector

__all__ = [
    "COMMIT_TO_APPLIED_BUCKETS",
    "DROP_REASONS",
    "MESSAGE_KINDS",
    "ROLLOUT_PHASES",
    "FleetCollector",
    "FleetSource",
    "IngestMetrics",
    "IngestState",
    "ReleaseMetrics",
    "RolloutCollector",
    "RolloutSource",
    "ServerMetrics",
    "ServiceLevels",
    "histogram_buckets",
    "read_service_levels",
    "service_levels",
]

log = logging.getLogger(__name__)

MESSAGE_KINDS = ("status", "events", "health", "online")
"""The message kinds the server ingests (one label value each, exported from zero)."""

DROP_REASONS = ("oversized", "malformed_json", "bad_schema", "spoofed", "bad_field", "unknown_device",
                "queue_full", "store_refused")
"""Why the ingest path drops a message (one label value each, exported from zero)."""

COMMIT_TO_APPLIED_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
                             86400.0)
"""Upper bounds (seconds) of the commit-to-applied and drift-correction histograms."""

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)

_FAILED = "sync_failed"
_REFUSED = "sync_refused"
_ROLLED_BACK = "sync_rolled_back"
_SUCCEEDED = "sync_succeeded"
_DRIFT_DETECTED = "drift_detected"


# --- ingest and release counters -----------------------------------------------------------------


class IngestState(Protocol):
    """What the ingest path tells about itself at scrape time (``fleet_server.ingest.Ingestor``)."""

    def backlog_age(self) -> float:
        """Return the age in seconds of the oldest message received and not yet committed (0 when none)."""
        ...

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        ...

    def problems(self) -> list[str]:
        """Return the other reasons the ingest path is unhealthy (an ingest process down)."""
        ...


class _IngestStateCollector(Collector):
    """``fleet_ingest_backlog_age_seconds`` and ``fleet_broker_connected``, read from the bound ingest
    path at scrape time (absent while none is bound)."""

    def __init__(self, owner: IngestMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        """Yield the two gauges when an ingest path is bound."""
        age, connected = self._owner.backlog_age(), self._owner.broker_connected()
        if age is not None:
            yield GaugeMetricFamily("fleet_ingest_backlog_age_seconds",
                                    "Age of the oldest device message received, not yet committed (0: none).",
                                    value=age)
        if connected is not None:
            yield GaugeMetricFamily("fleet_broker_connected",
                                    "1 while the server's MQTT client is connected to the broker, else 0.",
                                    value=1.0 if connected else 0.0)


class IngestMetrics:
    """Collectors the MQTT ingest path updates; registered on ``registry`` at construction.

    Args:
        registry: the registry to register on (one per server; never the global default); None: a
            registry of its own (an ingest process, which relays its counts to the server process).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = CollectorRegistry() if registry is None else registry
        self.registry = registry
        self.messages_ingested = Counter(
            "fleet_messages_ingested", "Device messages decoded and committed to the store, by kind.",
            ["kind"], registry=registry)
        self.messages_dropped = Counter(
            "fleet_messages_dropped", "Device messages dropped before the store, by reason.",
            ["reason"], registry=registry)
        self.ingest_lag = Histogram(
            "fleet_ingest_lag_seconds", "Time from a message's own timestamp to its receipt by the server.",
            buckets=LAG_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "fleet_ingest_batch_size", "Messages written to the store per transaction.",
            buckets=BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge(
            "fleet_ingest_queue_depth", "Messages received and waiting for the store writer.",
            registry=registry)
        self.commit_delay = Gauge(
            "fleet_ingest_commit_delay_seconds",
            "Receipt of the oldest message of the last committed batch to its commit.", registry=registry)
        self.processes_up = Gauge(
            "fleet_ingest_processes_up", "Ingest processes running and reporting (0 while ingest runs "
            "inside the server process).", registry=registry)
        self.process_restarts = Counter(
            "fleet_ingest_process_restarts", "Ingest processes restarted after they exited unasked.",
            registry=registry)
        self._state: IngestState | None = None
        registry.register(_IngestStateCollector(self))
        for kind in MESSAGE_KINDS:
            self.messages_ingested.labels(kind=kind)
        for reason in DROP_REASONS:
            self.messages_dropped.labels(reason=reason)

    def ingested(self, kind: str, count: int = 1) -> None:
        """Count ``count`` messages of ``kind`` committed to the store."""
        self.messages_ingested.labels(kind=kind).inc(count)

    def dropped(self, reason: str, count: int = 1) -> None:
        """Count ``count`` messages dropped for ``reason`` (a :data:`DROP_REASONS` code)."""
        self.messages_dropped.labels(reason=reason).inc(count)

    def observe_lag(self, seconds: float) -> None:
        """Record one message's lag (received_at - ts); negative values (clock skew) count as 0."""
        self.ingest_lag.observe(max(0.0, seconds))

    def observe_batch(self, size: int) -> None:
        """Record the size of one committed batch."""
        self.batch_size.observe(size)

    def set_queue_depth(self, depth: int) -> None:
        """Set the number of messages waiting for the writer."""
        self.queue_depth.set(depth)

    def observe_commit_delay(self, seconds: float) -> None:
        """Record how long the oldest message of the batch just committed waited since its receipt."""
        self.commit_delay.set(max(0.0, seconds))

    def bind(self, state: IngestState) -> None:
        """Read the backlog age and the broker connection from ``state`` from now on (the server's
        ingest path binds itself when it starts)."""
        self._state = state

    def backlog_age(self) -> float | None:
        """Return the age of the oldest received, uncommitted message (None while no ingest is bound)."""
        state = self._state
        return None if state is None else max(0.0, state.backlog_age())

    def broker_connected(self) -> bool | None:
        """Return whether the ingest path is connected to the broker (None while none is bound)."""
        state = self._state
        return None if state is None else bool(state.connected)

    def problems(self) -> list[str]:
        """Return the bound ingest path's other health problems (none while none is bound)."""
        state = self._state
        return [] if state is None else state.problems()


class ReleaseMetrics:
    """Collectors the Git watcher updates: polls, verified releases, refused releases by reason.

    Args:
        registry: the registry to register on (a private one when None).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = CollectorRegistry() if registry is None else registry
        self.registry = registry
        self.polls = Counter("fleet_git_polls", "Polls of the Git mirror, by result (ok, error).",
                             ["result"], registry=registry)
        self.releases_verified = Counter(
            "fleet_releases_verified", "New signed releases verified and recorded by the Git watcher.",
            registry=registry)
        self.releases_refused = Counter(
            "fleet_releases_refused", "Release commits refused by the Git watcher, by reason.",
            ["reason"], registry=registry)
        for result in ("ok", "error"):
            self.polls.labels(result=result)

    def poll(self, ok: bool) -> None:
        """Count one poll of the mirror that succeeded (``ok``) or failed to fetch."""
        self.polls.labels(result="ok" if ok else "error").inc()

    def verified(self) -> None:
        """Count one newly verified and recorded release."""
        self.releases_verified.inc()

    def refused(self, reason: str) -> None:
        """Count one refused release commit; ``reason`` is a short code such as ``unsigned``."""
        self.releases_refused.labels(reason=reason).inc()


# --- service levels: the pure core ----------------------------------------------------------------


@dataclass(frozen=True)
class ServiceLevels:
    """The GitOps service levels over one window (definitions in ``docs/metrics.md``).

    Rates are ``None`` when their denominator is zero (nothing to measure yet).

    Attributes:
        syncs_succeeded, syncs_failed, syncs_refused, syncs_rolled_back: sync outcomes reported.
        drift_incidents: ``drift_detected`` events.
        applied_changes: applied-change events the store counted for the signed share.
        applied_from_signed_release: of those, the ones whose commit is a verified signed release.
        commit_to_applied_seconds: release commit time to applied, per applied event.
        drift_correction_seconds: drift detected to corrected, per correction.
    """

    syncs_succeeded: int
    syncs_failed: int
    syncs_refused: int
    syncs_rolled_back: int
    drift_incidents: int
    applied_changes: int
    applied_from_signed_release: int
    commit_to_applied_seconds: tuple[float, ...]
    drift_correction_seconds: tuple[float, ...]

    @property
    def sync_success_rate(self) -> float | None:
        """Succeeded syncs / every sync that reached an outcome (succeeded, failed, refused, rolled back)."""
        total = self.syncs_succeeded + self.syncs_failed + self.syncs_refused + self.syncs_rolled_back
        return self.syncs_succeeded / total if total else None

    @property
    def deployment_failure_rate(self) -> float | None:
        """(Failed + rolled back) / deployments attempted (succeeded + failed + rolled back)."""
        total = self.syncs_succeeded + self.syncs_failed + self.syncs_rolled_back
        return (self.syncs_failed + self.syncs_rolled_back) / total if total else None

    @property
    def rollback_rate(self) -> float | None:
        """Rolled back / deployments attempted (succeeded + failed + rolled back)."""
        total = self.syncs_succeeded + self.syncs_failed + self.syncs_rolled_back
        return self.syncs_rolled_back / total if total else None

    @property
    def signed_change_share(self) -> float | None:
        """Applied changes whose commit is a verified signed release / every applied change."""
        return self.applied_from_signed_release / self.applied_changes if self.applied_changes else None


def service_levels(event_counts: Mapping[str, int], *, applied: tuple[int, int],
                   commit_to_applied: Sequence[float], drift_recovery: Sequence[float]) -> ServiceLevels:
    """Build the service levels from the aggregates the store computes (pure).

    Args:
        event_counts: event type -> how many in the window.
        applied: (applied-change events, those whose commit is a recorded signed release).
        commit_to_applied: seconds from release commit to applied, one per applied event; negative
            values (clock skew between Git host and device) count as 0.
        drift_recovery: seconds from drift detected to corrected, one per correction; negatives as 0.
    """
    return ServiceLevels(
        syncs_succeeded=int(event_counts.get(_SUCCEEDED, 0)), syncs_failed=int(event_counts.get(_FAILED, 0)),
        syncs_refused=int(event_counts.get(_REFUSED, 0)),
        syncs_rolled_back=int(event_counts.get(_ROLLED_BACK, 0)),
        drift_incidents=int(event_counts.get(_DRIFT_DETECTED, 0)),
        applied_changes=applied[0], applied_from_signed_release=applied[1],
        commit_to_applied_seconds=tuple(max(0.0, v) for v in commit_to_applied),
        drift_correction_seconds=tuple(max(0.0, v) for v in drift_recovery))


def histogram_buckets(values: Sequence[float], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Return cumulative Prometheus buckets ``(le, count)`` for ``values``, ending with ``+Inf``."""
    buckets = [(repr(float(bound)), float(sum(1 for v in values if v <= bound))) for bound in bounds]
    buckets.append(("+Inf", float(len(values))))
    return buckets


# --- scrape-time collector -------------------------------------------------------------------------


class FleetSource(Protocol):
    """What :class:`FleetCollector` reads (``fleet_server.store.Store`` provides it)."""

    def summary(self) -> dict[str, Any]:
        """Return fleet totals: ``devices``, ``by_sync_state``, ``online``, ``offline``."""
        ...

    def event_counts(self, *, since: float | None = None) -> dict[str, int]:
        """Return event type -> count of events received at or after ``since``."""
        ...

    def commit_to_applied(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from release commit to applied, per applied event since ``since``."""
        ...

    def drift_recovery_times(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from drift detected to corrected, per correction since ``since``."""
        ...

    def applied_from_releases(self, *, since: float | None = None) -> tuple[int, int]:
        """Return (applied-change events, those whose commit is a recorded signed release)."""
        ...


def read_service_levels(source: FleetSource, *, since: float) -> ServiceLevels:
    """Read the aggregates for events received at or after ``since`` and build the service levels.

    Raises:
        StoreError: the store cannot be read.
    """
    return service_levels(source.event_counts(since=since), applied=source.applied_from_releases(since=since),
                          commit_to_applied=source.commit_to_applied(since=since),
                          drift_recovery=source.drift_recovery_times(since=since))


class FleetCollector(Collector):
    """Computes fleet gauges and service levels from the store when Prometheus scrapes.

    The service levels cover the events received in the last ``window`` seconds; the result is
    cached for ``min_interval`` seconds so that frequent scrapes do not re-read the history each
    time. A store that cannot be read yields no fleet metrics for that scrape (logged), so the
    ingest metrics are still served.

    Args:
        source: the store (see :class:`FleetSource`).
        window: seconds of event history the service levels cover.
        min_interval: seconds a computed result is reused.
        clock: returns the current POSIX time (injected so tests control it).

    Raises:
        ValueError: ``window`` is not positive or ``min_interval`` is negative.
    """

    def __init__(self, source: FleetSource, *, window: float = 7 * 86400.0, min_interval: float = 15.0,
                 clock: Callable[[], float] = time.time) -> None:
        if window <= 0 or min_interval < 0:
            raise ValueError("window must be positive and min_interval not negative")
        self._source = source
        self._window = window
        self._min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        """Yield the fleet metrics, recomputing them when the cached result is older than min_interval."""
        now = self._clock()
        with self._lock:
            cached = self._cached
            if cached is None or not 0 <= now - cached[0] < self._min_interval:
                try:
                    cached = (now, self._compute(now))
                except StoreError as exc:
                    log.warning("fleet metrics unavailable for this scrape: %s", exc)
                    return
                self._cached = cached
        yield from cached[1]

    def _compute(self, now: float) -> list[Metric]:
        summary = self._source.summary()
        by_state = GaugeMetricFamily("fleet_devices", "Devices known to the server, by sync state.",
                                     labels=["sync_state"])
        for sync_state, count in sorted(summary.get("by_sync_state", {}).items()):
            by_state.add_metric([str(sync_state)], float(count))
        online = GaugeMetricFamily("fleet_devices_online", "Devices known to the server, by online state.",
                                   labels=["online"])
        online.add_metric(["true"], float(summary.get("online", 0)))
        online.add_metric(["false"], float(summary.get("offline", 0)))
        levels = read_service_levels(self._source, since=now - self._window)
        outcomes = GaugeMetricFamily("fleet_sync_outcomes", "Sync outcomes in the window, by outcome.",
                                     labels=["outcome"])
        for outcome, count in (("succeeded", levels.syncs_succeeded), ("failed", levels.syncs_failed),
                               ("refused", levels.syncs_refused), ("rolled_back", levels.syncs_rolled_back)):
            outcomes.add_metric([outcome], float(count))
        metrics: list[Metric] = [
            by_state, online, outcomes,
            GaugeMetricFamily("fleet_slo_window_seconds", "Seconds of event history the service levels use.",
                              value=self._window),
            GaugeMetricFamily("fleet_drift_incidents", "Drift incidents (drift detected) in the window.",
                              value=float(levels.drift_incidents)),
        ]
        ratios = (
            ("fleet_sync_success_ratio", "Succeeded syncs / syncs with an outcome.",
             levels.sync_success_rate),
            ("fleet_deployment_failure_ratio", "(Failed + rolled back) / deployments attempted.",
             levels.deployment_failure_rate),
            ("fleet_rollback_ratio", "Rolled back / deployments attempted.", levels.rollback_rate),
            ("fleet_signed_change_ratio", "Applied changes that were verified signed releases.",
             levels.signed_change_share),
        )
        for name, doc, ratio in ratios:
            if ratio is not None:
                metrics.append(GaugeMetricFamily(name, doc + " In the window.", value=ratio))
        histograms = (
            ("fleet_commit_to_applied_seconds", "Release commit time to applied on a device.",
             levels.commit_to_applied_seconds),
            ("fleet_drift_correction_seconds", "Drift detected to drift corrected on a device.",
             levels.drift_correction_seconds),
        )
        for name, doc, values in histograms:
            buckets = histogram_buckets(values, COMMIT_TO_APPLIED_BUCKETS)
            metrics.append(HistogramMetricFamily(name, doc + " In the window.", buckets=buckets,
                                                 sum_value=float(sum(values))))
        return metrics


# --- rollouts ---------------------------------------------------------------------------------------


ROLLOUT_PHASES = ("pending", "running", "waiting_approval", "paused", "halted", "rolling_back", "rolled_back",
                  "succeeded", "aborted", "superseded")
"""Every phase a rollout can be in (one ``fleet_rollout_phase`` series each, 1 for the current one)."""


class RolloutSource(Protocol):
    """What :class:`RolloutCollector` reads (``fleet_server.rollouts.runner.RolloutRunner`` provides it)."""

    def metrics_snapshot(self) -> list[dict[str, Any]]:
        """Return, per rollout the runner holds: ``id``, ``release``, ``phase``, ``wave``, ``waves``
        (per wave a mapping device state -> count) and ``gates`` (per wave ``{"passed": n, "failed": n}``)."""
        ...


class RolloutCollector(Collector):
    """Rollout gauges computed from the runner's in-memory states when Prometheus scrapes.

    ``fleet_rollout_phase{rollout,release,phase}`` (1 for the current phase, 0 for the others),
    ``fleet_rollout_wave{rollout}`` (the current wave, 0-based), ``fleet_rollout_devices{rollout,wave,state}``
    and ``fleet_rollout_gate_evaluations{rollout,wave,result}`` (gate decisions so far).

    The runner answers only between two ticks, and a tick over a large fleet can last long: a scrape
    waits at most ``wait`` seconds for it, then serves the snapshot of the previous scrape (the
    fetch goes on in the background, one at a time), so ``/metrics`` never hangs on a tick.
    """

    def __init__(self, source: RolloutSource, *, wait: float = 0.5) -> None:
        self._source = source
        self._wait = wait
        self._lock = threading.Lock()
        self._last: list[dict[str, Any]] = []
        self._pending: threading.Event | None = None

    def _fetch(self, done: threading.Event) -> None:
        try:
            snapshot = self._source.metrics_snapshot()
            with self._lock:
                self._last = snapshot
        except Exception:  # a failing runner must not break the scrape
            log.exception("rollout metrics unavailable for this scrape")
        finally:
            with self._lock:
                self._pending = None
            done.set()

    def _snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            done = self._pending
            if done is None:
                done = self._pending = threading.Event()
                fetch = threading.Thread(target=self._fetch, args=(done,), name="rollout-metrics",
                                         daemon=True)
                fetch.start()
        done.wait(self._wait)
        with self._lock:
            return self._last

    def collect(self) -> Iterator[Metric]:
        """Yield the rollout metrics of every rollout the runner holds."""
        phase = GaugeMetricFamily("fleet_rollout_phase", "Rollout phase (1 for the current one).",
                                  labels=["rollout", "release", "phase"])
        wave = GaugeMetricFamily("fleet_rollout_wave", "The wave a rollout is at (0-based).",
                                 labels=["rollout"])
        devices = GaugeMetricFamily("fleet_rollout_devices", "Devices of a rollout wave, by state.",
                                    labels=["rollout", "wave", "state"])
        gates = GaugeMetricFamily("fleet_rollout_gate_evaluations",
                                  "Gate decisions of a rollout wave, by result.",
                                  labels=["rollout", "wave", "result"])
        for r in self._snapshot():
            rid = str(r["id"])
            for name in ROLLOUT_PHASES:
                phase.add_metric([rid, str(r["release"]), name], 1.0 if name == r["phase"] else 0.0)
            wave.add_metric([rid], float(r["wave"]))
            for k, counts in enumerate(r["waves"]):
                for state, n in sorted(counts.items()):
                    devices.add_metric([rid, str(k), str(state)], float(n))
            for k, results in enumerate(r["gates"]):
                for result, n in sorted(results.items()):
                    gates.add_metric([rid, str(k), result], float(n))
        yield from (phase, wave, devices, gates)


# --- the bundle the server wires ------------------------------------------------------------------


class ServerMetrics:
    """Every metric of one fleet server on its own registry.

    Attributes:
        registry: the :class:`CollectorRegistry` that ``GET /metrics`` renders.
        ingest: collectors of the MQTT ingest path.
        releases: collectors of the Git watcher.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        GCCollector(registry=self.registry)  # python_gc_*: how often the collector ran (interpreter.py)
        self.ingest = IngestMetrics(self.registry)
        self.releases = ReleaseMetrics(self.registry)
        self._fleet: FleetCollector | None = None
        self._rollouts: RolloutCollector | None = None
        self.role: RoleCollector | None = None

    def attach_fleet(self, source: FleetSource, *, window: float = 7 * 86400.0, min_interval: float = 15.0,
                     clock: Callable[[], float] = time.time) -> FleetCollector:
        """Register the scrape-time fleet collector reading ``source``; only one may be attached.

        Raises:
            ValueError: a fleet collector is already attached.
        """
        if self._fleet is not None:
            raise ValueError("a fleet collector is already attached to these metrics")
        self._fleet = FleetCollector(source, window=window, min_interval=min_interval, clock=clock)
        self.registry.register(self._fleet)
        return self._fleet

    def attach_rollouts(self, source: RolloutSource) -> RolloutCollector:
        """Register the rollout collector reading ``source``; only one may be attached.

        Raises:
            ValueError: a rollout collector is already attached.
        """
        if self._rollouts is not None:
            raise ValueError("a rollout collector is already attached to these metrics")
        self._rollouts = RolloutCollector(source)
        self.registry.register(self._rollouts)
        return self._rollouts

    def attach_role(self, store: str, role: Callable[[], str]) -> None:
        """Register the role gauge: backend ``store``, current role ``role()`` (see role_metrics)."""
        self.role = RoleCollector(store, role)
        self.registry.register(self.role)

    def exposition(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
