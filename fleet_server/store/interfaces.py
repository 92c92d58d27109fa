"""What the rest of the server asks of the store, one protocol per concern, so that a backend is
chosen by configuration and no caller depends on one: :class:`IngestStore` (registry and ingest
writes), :class:`ReadStore` (API, dashboard and metrics reads), :class:`AuditStore` (audit log and
recorded releases), :class:`RolloutStore` (the rollout runner's writes, feed and reads),
:class:`NotificationStore` (webhook deliveries) and :class:`FleetStore`, all of them plus the backend's
name and ``close``.

Every method raises :class:`~fleet_server.errors.StoreError` when the database cannot be read or
written; a write that fails stores nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from fleet_server.store.notification_records import NewDelivery
from fleet_server.store.records import IngestBatch, RolloutWrite

__all__ = ["AuditStore", "CopyStore", "FleetStore", "IngestStore", "NotificationStore", "ReadStore",
           "RolloutStore"]


class IngestStore(Protocol):
    """Registry and ingest writes (the MQTT writer, enrolment, retention)."""

    def apply_batch(self, batch: IngestBatch) -> None:
        """Write one batch of decoded messages in ONE transaction: upsert the devices it concerns, insert its
        events and health samples, add its counters. All or nothing. An event or health sample
        already stored (same device, time and type: a redelivery) is not stored twice."""
        ...

    def register_device(self, device_id: str, *, labels: Mapping[str, str] | None = None,
                        profile: str | None = None, now: float | None = None) -> None:
        """Make ``device_id`` known before it ever reports (the ``unknown_devices: refuse`` policy
        accepts only known devices). Labels and profile are set only when given; the next ``status`` from the
        device that carries labels or a profile replaces them (the device's report wins)."""
        ...

    def known_device(self, device_id: str) -> bool:
        """Return True when the device has a registry row (it reported or was registered)."""
        ...

    def known_devices(self) -> set[str]:
        """Return the ids of every device with a registry row."""
        ...

    def prune(self, now: float, events_max_age: float, health_max_age: float) -> int:
        """Delete events and health samples received longer ago than their maximum age; return how many rows
        were deleted. Deletes in chunks so that ingest is never blocked for long."""
        ...


class ReadStore(Protocol):
    """Reads for the API, the dashboard and the metrics."""

    def devices(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                online: bool | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        """Return devices (ordered by id) matching every given label, the sync state and online flag."""
        ...

    def devices_page_json(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                          online: bool | None = None, limit: int = 100, offset: int = 0,
                          id_prefix: str | None = None, sort: str = "id", descending: bool = False) -> str:
        """Return the JSON text of the ``GET /api/v1/devices`` answer: one page of devices matching every
        filter (ids starting with ``id_prefix`` when given), ordered by ``sort`` then id, with how many
        match in all."""
        ...

    def count_devices(self, *, label: Mapping[str, str] | None = None, sync_state: str | None = None,
                      online: bool | None = None) -> int:
        """Return how many devices match the same filters as :meth:`devices`."""
        ...

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return one device's registry row, or None when it is unknown."""
        ...

    def device_events(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Return the device's most recent events, newest first."""
        ...

    def device_health(self, device_id: str, since: float | None = None,
                      limit: int = 500) -> list[dict[str, Any]]:
        """Return the device's health samples (newest first), only those at or after ``since``."""
        ...

    def summary(self) -> dict[str, Any]:
        """Return fleet totals: ``devices``, ``by_sync_state``, ``online``/``offline`` and ``releases`` (how
        many devices run each release version; ``null`` for none reported)."""
        ...

    def counters(self) -> dict[str, int]:
        """Return the persistent ingest counters (name -> total)."""
        ...

    def event_counts(self, *, since: float | None = None) -> dict[str, int]:
        """Return how many events of each type arrived at or after ``since`` (received time)."""
        ...

    def commit_to_applied(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from release commit to ``sync_succeeded`` for the newest applied events
        whose release commit time is known."""
        ...

    def drift_recovery_times(self, *, since: float | None = None, limit: int = 10000) -> list[float]:
        """Return seconds from ``drift_detected`` to the next ``drift_corrected`` on the same device."""
        ...

    def applied_from_releases(self, *, since: float | None = None) -> tuple[int, int]:
        """Return (``sync_succeeded`` events, those whose commit is a recorded signed release)."""
        ...


class AuditStore(Protocol):
    """The audit log and the signed releases the Git watcher recorded."""

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Append one entry to the audit log (who did what to which target, and why)."""
        ...

    def audit(self, limit: int = 100, *, action: str | None = None,
              before: int | None = None) -> list[dict[str, Any]]:
        """Return the newest audit entries first (only those of ``action``, and with an id below
        ``before``, when given)."""
        ...

    def record_release(self, version: int, commit: str, signers: Sequence[str], seen_at: float, *,
                       committed_at: float | None = None) -> bool:
        """Record a verified signed release; return False when that version is already known."""
        ...

    def releases(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return the newest recorded releases first."""
        ...

    def release_commit(self, version: int) -> str | None:
        """Return the commit of a recorded signed release, or None when it is unknown."""
        ...

    def request_git_poll(self) -> None:
        """Record that the Git mirror should be polled now (a webhook reached a replica that does not
        run the Git watcher): one more poll request; the leader's watcher polls when the count moves."""
        ...

    def git_poll_requests(self) -> int:
        """Return how many Git polls were requested through the store so far."""
        ...


class RolloutStore(Protocol):
    """The rollout runner's writes and the rollout reads, with its change feed and the fleet baseline."""

    def fence(self, term: int | None) -> None:
        """Make every later rollout write (``write_rollouts``, ``mark_published``, ``set_fleet_baseline``)
        carry the leadership ``term``: it is refused with :class:`~fleet_server.errors.NotLeader`, in
        its own transaction, when the stored term is newer, and always for a negative term (not
        leading). None leaves writes unfenced (tools, tests)."""
        ...

    def write_rollouts(self, write: RolloutWrite) -> None:
        """Write the rollout runner's step results in ONE transaction: rollout states, their audit entries,
        gate decisions, new (unpublished) assignments, progress samples and the read cursor."""
        ...

    def fleet_baseline(self) -> tuple[int, str] | None:
        """Return the stored fleet baseline ``(release, commit)``, None before the first one."""
        ...

    def set_fleet_baseline(self, release: int, commit: str) -> None:
        """Store the fleet baseline (the last-good release devices without an assignment run)."""
        ...

    def rollout_rows(self, *, phases: Sequence[str] | None = None, limit: int = 100,
                     with_state: bool = True) -> list[dict[str, Any]]:
        """Return rollouts newest first, with their state decoded (unless ``with_state`` is False: then as
        :meth:`rollout_summaries` returns them); only the given phases when set."""
        ...

    def rollout_summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return rollouts newest first without their state (id, releases, phase, wave, who, when)."""
        ...

    def rollout_row(self, rollout_id: str) -> dict[str, Any] | None:
        """Return one rollout with its plan and state decoded, or None."""
        ...

    def rollout_gates(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """Return a rollout's gate decisions, oldest first."""
        ...

    def rollout_samples(self, rollout_id: str, limit: int = 5000) -> list[dict[str, Any]]:
        """Return a rollout's wave progress samples, oldest first."""
        ...

    def latest_rollout_samples(self, rollout_id: str) -> list[dict[str, Any]]:
        """Return a rollout's newest progress sample of every wave, by wave."""
        ...

    def rollout_audit(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """Return a rollout's audit entries, oldest first."""
        ...

    def rollout_device_rows(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        """Return the stored device statuses of a rollout (device -> status as stored), by device."""
        ...

    def rollout_devices_page(self, rollout_id: str, *, wave: int | None = None, state: str | None = None,
                             offset: int = 0, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """Return ``(total, page)``: how many device rows of the rollout match ``wave`` and ``state`` (when
        given) and the page of them from ``offset`` (by device id), each the stored status with
        ``device``."""
        ...

    def rollout_supersessions(self, rollout_ids: Sequence[str]) -> dict[str, tuple[str, float | None]]:
        """Return ``{rollout id: (superseded_by, superseded_at)}`` for those of ``rollout_ids`` a newer
        rollout superseded."""
        ...

    def rollout_exists(self, rollout_id: str) -> bool:
        """Tell whether a rollout with this id is stored (without reading its state)."""
        ...

    def assignments(self, *, unpublished: bool = False) -> list[dict[str, Any]]:
        """Return the current ``desired`` assignment of every assigned device (only the unpublished ones when
        asked), ordered by device."""
        ...

    def mark_published(self, published: Sequence[tuple[str, int, str]], at: float) -> None:
        """Mark the assignments ``(device, release, rollout_id)`` as published at ``at`` (rows replaced by a
        newer assignment since are left alone)."""
        ...

    def rollout_cursor(self) -> dict[str, int] | None:
        """Return the rollout runner's read positions (``events``, ``health``), None before the
        first write."""
        ...

    def history_heads(self) -> dict[str, int]:
        """Return the highest row id of ``events`` and ``health`` (0 when empty)."""
        ...

    def events_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return events with a row id above ``after``, oldest first (``detail`` decoded)."""
        ...

    def health_after(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return health samples with a row id above ``after``, oldest first (metrics and checks decoded)."""
        ...

    def device_snapshot(self) -> list[dict[str, Any]]:
        """Return every device's id, labels, profile, online and paused flags and release (by id)."""
        ...

    def registry_change_head(self) -> int:
        """Return the sequence number of the latest registry change (0 when none)."""
        ...

    def registry_changes(self, after: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Return the devices whose registry row changed (inserted, or online, release, paused, labels or
        profile changed) after change ``after``, oldest change first: each with ``seq`` and the
        fields :meth:`~.store.Store.device_snapshot` returns."""
        ...


class CopyStore(Protocol):
    """Whole tables out and in, for ``fleet-server store copy`` (:mod:`fleet_server.store.copy`)."""

    @property
    def where(self) -> str:
        """The store's URL, for messages."""
        ...

    def dump_rows(self, table: str, columns: Sequence[str], chunk: int) -> Iterator[list[tuple[Any, ...]]]:
        """Yield every row of ``table`` (those ``columns``), ``chunk`` rows at a time."""
        ...

    def load_rows(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` into ``table`` in one transaction, with their own ids."""
        ...

    def clear_table(self, table: str) -> None:
        """Delete every row of ``table`` (the registry change rows triggers made while copying)."""
        ...

    def finish_load(self) -> None:
        """Move id generators past the copied ids, so that new rows get new ones."""
        ...


class NotificationStore(Protocol):
    """Webhook deliveries: the enqueue, the worker's reads and writes, the delivery log."""

    def enqueue_deliveries(self, rows: Sequence[NewDelivery]) -> int:
        """Store ``rows`` as pending deliveries due now, in one transaction; a (receiver, event id)
        already stored is skipped. Return how many were added."""
        ...

    def due_deliveries(self, now: float, limit: int = 50) -> list[dict[str, Any]]:
        """Return pending deliveries due at or before ``now``, the longest due first."""
        ...

    def record_attempt(self, delivery_id: int, *, at: float, state: str, status: int | None,
                       error: str | None, next_attempt: float) -> None:
        """Record one delivery attempt: its time, HTTP status, error, the new state and the next try."""
        ...

    def deliveries_page(self, *, state: str | None = None, offset: int = 0,
                        limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """Return ``(total, page)`` of deliveries (in ``state`` when given), newest first, without bodies."""
        ...

    def delivery_counts(self) -> dict[str, int]:
        """Return how many deliveries are in each state."""
        ...

    def notify_cursor(self) -> int | None:
        """Return the id of the last event the notifier looked at, None before its first look."""
        ...

    def set_notify_cursor(self, after: int) -> None:
        """Store the id of the last event the notifier looked at."""
        ...

    def postpone_receiver(self, receiver: str, now: float, until: float) -> int:
        """Move every pending delivery of ``receiver`` due at ``now`` to ``until``; return how many."""
        ...

    def prune_deliveries(self, before: float) -> int:
        """Delete delivered and failed deliveries whose event is older than ``before``; return how many."""
        ...

    def offline_devices(self, before: float, since: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Return the devices that went offline at or after ``since`` and before ``before``, the longest
        offline first."""
        ...


class FleetStore(IngestStore, ReadStore, AuditStore, RolloutStore, CopyStore, NotificationStore, Protocol):
    """The whole store: every concern, the backend's name (``sqlite`` or ``postgresql``) and ``close``."""

    backend: str
    schema_versions: tuple[int, int]
    """The schema version the store had when opened and the one it has now (after migrations)."""

    def device_columns(self) -> tuple[str, ...]:
        """Return the columns of a device row, in table order."""
        ...

    def close(self) -> None:
        """Close every connection (idempotent)."""
        ...
