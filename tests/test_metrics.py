"""Metrics: ingest collectors, and the GitOps service levels computed from a real SQLite store."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edge_core.messages import event_message, online_message, status_message
from fleet_server import metrics as metrics_module
from fleet_server.metrics import (
    COMMIT_TO_APPLIED_BUCKETS,
    DROP_REASONS,
    FleetCollector,
    IngestMetrics,
    ServerMetrics,
    histogram_buckets,
    read_service_levels,
    service_levels,
)
from fleet_server.store import FleetStore, IngestBatch, Store

NOW = 1_800_000_000.0
RELEASE_COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40
COMMITTED_AT = NOW - 1000.0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def store(any_store: FleetStore) -> FleetStore:
    """A new store on each backend (SQLite, PostgreSQL)."""
    return any_store


def _event(batch: IngestBatch, device: str, kind: str, ts: float, commit: str | None,
           received_at: float | None = None) -> None:
    msg = event_message(device, type=kind, commit=commit, release=3 if commit == RELEASE_COMMIT else 7, ts=ts)
    batch.add("events", msg, ts + 1.0 if received_at is None else received_at)


def _fill(store: FleetStore) -> None:
    """A fleet with known history (see the expected values in the tests below)."""
    early = IngestBatch()
    _event(early, "dev-1", "sync_succeeded", NOW - 900, RELEASE_COMMIT)     # 100 s after the commit
    store.apply_batch(early)
    # The release is recorded after dev-1 reported it, before the others did: both orders count.
    assert store.record_release(3, RELEASE_COMMIT, ["ed25519:k"], NOW - 950, committed_at=COMMITTED_AT)
    batch = IngestBatch()
    _event(batch, "dev-2", "sync_succeeded", NOW - 700, RELEASE_COMMIT)     # 300 s after the commit
    _event(batch, "dev-3", "sync_failed", NOW - 690, RELEASE_COMMIT)
    _event(batch, "dev-4", "sync_rolled_back", NOW - 680, RELEASE_COMMIT)
    _event(batch, "dev-5", "sync_refused", NOW - 670, OTHER_COMMIT)
    _event(batch, "dev-6", "sync_succeeded", NOW - 660, OTHER_COMMIT)       # not a verified release
    _event(batch, "dev-1", "sync_started", NOW - 650, RELEASE_COMMIT)
    _event(batch, "dev-1", "drift_detected", NOW - 500, RELEASE_COMMIT)
    _event(batch, "dev-1", "drift_corrected", NOW - 440, RELEASE_COMMIT)    # corrected in 60 s
    _event(batch, "dev-2", "drift_detected", NOW - 300, RELEASE_COMMIT)     # still open
    # Older than the 7-day window: must not count.
    _event(batch, "dev-7", "sync_failed", NOW - 10 * 86400, RELEASE_COMMIT, received_at=NOW - 10 * 86400)
    batch.add("status", status_message("dev-1", commit=RELEASE_COMMIT, release=3, sync_state="in_sync",
                                       drift={}, paused=False, ts=NOW - 400), NOW - 399)
    batch.add("status", status_message("dev-3", commit=RELEASE_COMMIT, release=3, sync_state="failed",
                                       drift={}, paused=False, ts=NOW - 400), NOW - 399)
    batch.add("online", online_message("dev-1", True, NOW - 400), NOW - 399)
    store.apply_batch(batch)


def test_service_levels_from_store_have_exact_values(store: FleetStore) -> None:
    _fill(store)
    levels = read_service_levels(store, since=NOW - 7 * 86400)
    assert (levels.syncs_succeeded, levels.syncs_failed, levels.syncs_refused, levels.syncs_rolled_back) \
        == (3, 1, 1, 1)
    assert levels.sync_success_rate == pytest.approx(3 / 6)
    assert levels.deployment_failure_rate == pytest.approx(2 / 5)
    assert levels.rollback_rate == pytest.approx(1 / 5)
    assert levels.drift_incidents == 2
    assert sorted(levels.drift_correction_seconds) == [pytest.approx(60.0)]
    assert sorted(levels.commit_to_applied_seconds) == [pytest.approx(100.0), pytest.approx(300.0)]
    assert (levels.applied_changes, levels.applied_from_signed_release) == (3, 2)
    assert levels.signed_change_share == pytest.approx(2 / 3)


def test_window_excludes_older_events(store: FleetStore) -> None:
    _fill(store)
    everything = read_service_levels(store, since=0.0)
    assert everything.syncs_failed == 2
    recent = read_service_levels(store, since=NOW - 600)
    assert (recent.syncs_succeeded, recent.drift_incidents) == (0, 2)


def test_rates_are_none_without_data() -> None:
    levels = service_levels({}, applied=(0, 0), commit_to_applied=[], drift_recovery=[])
    assert levels.sync_success_rate is None
    assert levels.deployment_failure_rate is None
    assert levels.rollback_rate is None
    assert levels.signed_change_share is None


def test_refusals_count_against_success_but_not_deployment_failure() -> None:
    levels = service_levels({"sync_succeeded": 1, "sync_refused": 3}, applied=(1, 1),
                            commit_to_applied=[-5.0], drift_recovery=[])
    assert levels.sync_success_rate == pytest.approx(0.25)
    assert levels.deployment_failure_rate == 0.0
    assert levels.commit_to_applied_seconds == (0.0,)   # clock skew never yields a negative time


def test_histogram_buckets_are_cumulative() -> None:
    buckets = histogram_buckets([3.0, 5.0, 50.0, 100000.0], (5.0, 60.0))
    assert buckets == [("5.0", 2.0), ("60.0", 3.0), ("+Inf", 4.0)]


def test_exposition_has_fleet_and_service_level_metrics(store: FleetStore) -> None:
    _fill(store)
    server_metrics = ServerMetrics()
    server_metrics.attach_fleet(store, clock=lambda: NOW)
    samples = _samples(server_metrics.exposition().decode())
    assert samples[("fleet_devices", (("sync_state", "in_sync"),))] == 1
    assert samples[("fleet_devices", (("sync_state", "failed"),))] == 1
    assert samples[("fleet_devices_online", (("online", "true"),))] == 1
    assert samples[("fleet_devices_online", (("online", "false"),))] == 6
    assert samples[("fleet_sync_outcomes", (("outcome", "succeeded"),))] == 3
    assert samples[("fleet_sync_outcomes", (("outcome", "rolled_back"),))] == 1
    assert samples[("fleet_sync_success_ratio", ())] == pytest.approx(0.5)
    assert samples[("fleet_deployment_failure_ratio", ())] == pytest.approx(0.4)
    assert samples[("fleet_rollback_ratio", ())] == pytest.approx(0.2)
    assert samples[("fleet_signed_change_ratio", ())] == pytest.approx(2 / 3)
    assert samples[("fleet_drift_incidents", ())] == 2
    assert samples[("fleet_commit_to_applied_seconds_count", ())] == 2
    assert samples[("fleet_commit_to_applied_seconds_sum", ())] == pytest.approx(400.0)
    assert samples[("fleet_commit_to_applied_seconds_bucket", (("le", "120.0"),))] == 1
    assert samples[("fleet_commit_to_applied_seconds_bucket", (("le", "300.0"),))] == 2
    assert samples[("fleet_drift_correction_seconds_count", ())] == 1
    assert len(COMMIT_TO_APPLIED_BUCKETS) + 1 == sum(
        1 for name, _ in samples if name == "fleet_drift_correction_seconds_bucket")


def test_exposition_counts_the_garbage_collections_of_each_generation() -> None:
    server_metrics = ServerMetrics()
    before = _samples(server_metrics.exposition().decode())
    gc.collect()  # a full collection: generation 2
    after = _samples(server_metrics.exposition().decode())
    key = ("python_gc_collections_total", (("generation", "2"),))
    assert after[key] >= before[key] + 1
    assert {("python_gc_collections_total", (("generation", g),)) for g in "012"} <= set(after)


def test_empty_store_exports_no_ratios(store: FleetStore) -> None:
    server_metrics = ServerMetrics()
    server_metrics.attach_fleet(store, clock=lambda: NOW)
    samples = _samples(server_metrics.exposition().decode())
    assert samples[("fleet_devices_online", (("online", "false"),))] == 0
    assert ("fleet_sync_success_ratio", ()) not in samples
    assert samples[("fleet_commit_to_applied_seconds_count", ())] == 0


def test_collector_caches_between_scrapes(store: FleetStore) -> None:
    clock = [NOW]
    collector = FleetCollector(store, min_interval=30.0, clock=lambda: clock[0])
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("fleet_sync_outcomes", {"outcome": "succeeded"}) == 0
    _fill(store)
    clock[0] = NOW + 10
    assert registry.get_sample_value("fleet_sync_outcomes", {"outcome": "succeeded"}) == 0   # cached
    clock[0] = NOW + 31
    assert registry.get_sample_value("fleet_sync_outcomes", {"outcome": "succeeded"}) == 3


def test_closed_store_yields_no_fleet_metrics_but_keeps_ingest(tmp_path: Path) -> None:
    db = Store(tmp_path / "gone.db")
    server_metrics = ServerMetrics()
    server_metrics.attach_fleet(db, clock=lambda: NOW)
    db.close()
    server_metrics.ingest.ingested("status", 2)
    samples = _samples(server_metrics.exposition().decode())
    assert samples[("fleet_messages_ingested_total", (("kind", "status"),))] == 2
    assert not any(name.startswith("fleet_devices") for name, _ in samples)


def test_ingest_metrics_count_and_observe() -> None:
    registry = CollectorRegistry()
    ingest = IngestMetrics(registry)
    ingest.ingested("events", 5)
    ingest.dropped("spoofed")
    ingest.dropped("spoofed")
    ingest.observe_lag(0.2)
    ingest.observe_lag(-3.0)
    ingest.observe_batch(1000)
    ingest.set_queue_depth(17)
    assert registry.get_sample_value("fleet_messages_ingested_total", {"kind": "events"}) == 5
    assert registry.get_sample_value("fleet_messages_dropped_total", {"reason": "spoofed"}) == 2
    for reason in DROP_REASONS:
        assert registry.get_sample_value("fleet_messages_dropped_total", {"reason": reason}) is not None
    assert registry.get_sample_value("fleet_ingest_lag_seconds_count") == 2
    assert registry.get_sample_value("fleet_ingest_lag_seconds_bucket", {"le": "0.005"}) == 1
    assert registry.get_sample_value("fleet_ingest_lag_seconds_sum") == pytest.approx(0.2)
    assert registry.get_sample_value("fleet_ingest_batch_size_sum") == 1000
    assert registry.get_sample_value("fleet_ingest_queue_depth") == 17


def test_two_servers_do_not_share_collectors(store: FleetStore) -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.ingest.dropped("oversized")
    assert second.registry.get_sample_value("fleet_messages_dropped_total", {"reason": "oversized"}) == 0
    first.attach_fleet(store, clock=lambda: NOW)
    with pytest.raises(ValueError, match="already attached"):
        first.attach_fleet(store)


def test_module_exports_are_pinned() -> None:
    assert sorted(metrics_module.__all__) == sorted([
        "COMMIT_TO_APPLIED_BUCKETS", "DROP_REASONS", "MESSAGE_KINDS", "FleetCollector",
        "FleetSource", "IngestMetrics", "IngestState", "ReleaseMetrics",
        "ServerMetrics", "ServiceLevels", "histogram_buckets", "read_service_levels", "service_levels",
        "ROLLOUT_PHASES", "RolloutCollector", "RolloutSource"])
