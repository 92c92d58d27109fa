"""What goes in and out of the store, whatever the backend: ingest batches, the rollout runner's
writes, message timestamps, and the JSON encoding of the columns that hold documents.

Pure: no SQL, no I/O. Every backend turns these into its own statements and its rows back into the
plain dictionaries the API, the metrics and the rollout runner read.

Device labels and profile: a ``status`` that carries ``labels`` or ``profile`` replaces the
device's labels or profile (``labels: {}`` clears them); a status without them leaves them as they
are. ``register_device`` sets them too, so the last write wins — and since the agent sends its
``agent.yaml`` labels and profile with every status, the device's own report wins in the end.
Registering with labels is a seed for devices that have not reported yet (or run an agent that does
not send them).

Timestamps are POSIX seconds (floats). Message timestamps may also be ISO-8601 text (``...Z``);
they are converted on the way in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "DEVICE_COLUMNS",
    "GUARDS",
    "INGEST_KINDS",
    "IngestBatch",
    "Received",
    "RolloutWrite",
    "device_row_groups",
    "device_updates",
    "event_rows",
    "guard_of",
    "health_row",
    "request_count",
    "to_epoch",
]

INGEST_KINDS = ("status", "events", "health", "online")
"""The device-to-server message kinds, which are also the last level of their topics."""

# Keys of an event message that have their own column; the rest goes to ``detail``.
_EVENT_COLUMNS = ("device", "ts", "type", "commit", "release", "reason", "step")
_EVENT_ENVELOPE = frozenset({*_EVENT_COLUMNS, "schema", "kind"})
# Keys of a status message copied to the device row (message key -> column).
_STATUS_FIELDS = (("release", "release"), ("revision", "revision"), ("sync_state", "sync_state"),
                  ("last_error", "last_error"), ("profile", "profile"))
DEVICE_COLUMNS = ("id", "labels", "profile", "first_seen", "last_seen", "online", "online_ts", "release",
                  "revision", "sync_state", "paused", "pause_reason", "drift", "last_error", "status_ts",
                  "last_event", "last_event_ts", "registered", "repeat_count", "repeat_last_seen")
"""The columns of a device row, in table order."""
# Events whose reason becomes the device's ``last_error`` (a ``sync_succeeded`` clears it).
_ERROR_EVENTS = frozenset({"sync_failed", "sync_refused", "sync_rolled_back"})


def _last_error(event: Mapping[str, Any]) -> str:
    """``sync_refused (release 3): <reason>``: what a device's latest failure event says."""
    release = as_int(event.get("release"))
    where = f" (release {release})" if release is not None else ""
    return f"{event.get('type')}{where}: {as_text(event.get('reason')) or 'no reason given'}"[:500]


def to_epoch(value: object) -> float | None:
    """Turn a message timestamp (POSIX seconds, or ISO-8601 text such as ``2024-05-01T12:00:00Z``)
    into POSIX seconds; None when it is absent or not a timestamp."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return parsed.timestamp()
    return None


@dataclass(frozen=True)
class Received:
    """One decoded message, the server time at which it arrived, and the time it is stored under:
    its own timestamp, or the arrival time when it carries none."""

    message: Mapping[str, Any]
    received_at: float
    ts: float


@dataclass
class IngestBatch:
    """Decoded messages by kind plus counter increments, written by ``apply_batch`` in one
    transaction. Messages of one kind keep their arrival order."""

    status: list[Received] = field(default_factory=list)
    events: list[Received] = field(default_factory=list)
    health: list[Received] = field(default_factory=list)
    online: list[Received] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, message: Mapping[str, Any], received_at: float, ts: float | None = None) -> None:
        """Append one decoded message of ``kind`` (one of :data:`INGEST_KINDS`); ``ts`` is its own
        timestamp in POSIX seconds when the caller has already converted it.

        Raises:
            ValueError: ``kind`` is not an ingest kind.
        """
        if kind not in INGEST_KINDS:
            raise ValueError(f"unknown message kind {kind!r}")
        bucket: list[Received] = getattr(self, kind)
        if ts is None:
            ts = to_epoch(message.get("ts"))
        bucket.append(Received(message, received_at, received_at if ts is None else ts))

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the persistent counter ``name`` when the batch is applied."""
        self.counters[name] = self.counters.get(name, 0) + n

    def __len__(self) -> int:
        return len(self.status) + len(self.events) + len(self.health) + len(self.online)


@dataclass
class RolloutWrite:
    """What the rollout runner writes in ONE transaction (``write_rollouts``).

    Attributes:
        rollouts: rollout rows (``id, release, commit, previous, plan, state, phase, wave, actor,
            reason, created, updated``; ``plan`` and ``state`` as JSON-able values).
        audit: audit rows (``at, actor, action, target, reason, detail``).
        gates: gate decisions (``rollout_id, wave, at, passed, detail``).
        assignments: new ``desired`` assignments (``device, rollout_id, release, commit, assigned_at``),
            stored unpublished; the latest one per device wins.
        samples: wave progress samples (``rollout_id, wave, ts, done, failed, pending, offline,
            deferred, skipped``).
        cursor: the runner's read positions (``events``, ``health``: the last row id consumed).
        devices: rollout device rows that changed (``rollout_id, device, wave, state, data``).
    """

    rollouts: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    assignments: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    cursor: dict[str, int] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)


# One encoder for the ingest hot path: json.dumps with options would build a new one per call.
_COMPACT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def to_json(value: object) -> str | None:
    """Encode a document column (compact, sorted keys); None stays None."""
    return None if value is None else _COMPACT_JSON.encode(value)


def from_json(text: object) -> Any:
    """Decode a document column; None when it is absent or not JSON."""
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def request_count(text: object) -> int:
    """A stored request count (an integer as text); 0 when it is not one."""
    try:
        return int(str(text))
    except ValueError:
        return 0


def as_text(value: object) -> str | None:
    """A message value for a text column: strings as they are, anything else as JSON."""
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def as_int(value: object) -> int | None:
    """A message value for an integer column (a bool is not an integer here)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def device_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored device row as the API reads it: labels and drift decoded, flags as booleans."""
    out = dict(row)
    out["labels"] = from_json(out.get("labels")) or {}
    out["drift"] = from_json(out.get("drift"))
    for flag in ("online", "paused", "registered"):
        out[flag] = None if out.get(flag) is None else bool(out[flag])
    return out


def event_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored event row with its ``detail`` decoded."""
    out = dict(row)
    out["detail"] = from_json(out.get("detail")) or {}
    return out


def registry_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A registry change row (the device snapshot's fields) with labels decoded, flags as booleans."""
    out = dict(row)
    labels = out.get("labels")
    out["labels"] = (json.loads(labels) if isinstance(labels, str) and labels else None) or {}
    for flag in ("online", "paused"):
        out[flag] = None if out.get(flag) is None else bool(out[flag])
    return out


def fleet_summary(groups: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    """Fold ``(sync_state, online, release, count)`` groups of the registry into the fleet totals
    ``summary`` returns."""
    total = online = 0
    by_state: dict[str, int] = {}
    by_release: dict[int | None, int] = {}
    for sync_state, is_online, release, count in groups:
        n = int(count)
        total += n
        online += n if is_online == 1 else 0
        key = str(sync_state if sync_state is not None else "unknown")
        by_state[key] = by_state.get(key, 0) + n
        by_release[release] = by_release.get(release, 0) + n
    ordered = sorted(by_release.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
    return {"devices": total, "by_sync_state": dict(sorted(by_state.items())), "online": online,
            "offline": total - online, "releases": [{"release": r, "devices": n} for r, n in ordered]}


GUARDS = ("status_ts", "last_event_ts")
"""The time columns that guard a kind of device-row update (status, event): it is written only over
an older one. ``online`` has none: a last will carries the time its session began, so an
``online: false`` is often older than the ``online: true`` it follows (see docs/mqtt.md)."""


def device_updates(batch: IngestBatch) -> dict[str, dict[str, Any]]:
    """Merge the batch into device-row updates, later messages of a kind winning: per device ``id``,
    ``first_seen``, ``last_seen`` and, under ``status``, ``online`` and ``event``, the columns each
    kind of report sets with its time column, in the order they were set.

    The writers apply the status and event columns only when their time is not older than the stored
    one (:data:`GUARDS`): with replicas sharing the reports (MQTT shared subscriptions), one device's
    reports may be committed out of order, and a retained copy may arrive after a newer report."""
    updates: dict[str, dict[str, Any]] = {}

    def touch(r: Received, part: str | None = None) -> dict[str, Any]:
        device = str(r.message["device"])
        upd = updates.setdefault(device, {"id": device, "first_seen": r.received_at,
                                          "last_seen": r.received_at})
        upd["first_seen"] = min(upd["first_seen"], r.received_at)
        upd["last_seen"] = max(upd["last_seen"], r.received_at)
        return upd.setdefault(part, {}) if part else upd

    for r in batch.status:
        m, upd = r.message, touch(r, "status")
        for key, column in _STATUS_FIELDS:
            if key in m:
                upd[column] = as_int(m[key]) if column == "release" else as_text(m[key])
        if "revision" not in m and "commit" in m:
            upd["revision"] = as_text(m["commit"])
        if isinstance(m.get("labels"), Mapping):
            upd["labels"] = to_json(dict(m["labels"]))
        if "drift" in m:
            upd["drift"] = to_json(m["drift"])
        if "paused" in m:
            paused = m["paused"]
            upd["paused"] = 1 if paused else 0
            upd["pause_reason"] = paused if isinstance(paused, str) else as_text(m.get("pause_reason"))
        # while its last sync failed a status counts the failures in a row; without them it did not fail
        upd["repeat_count"] = as_int(m.get("repeat_count"))
        upd["repeat_last_seen"] = to_epoch(m.get("last_seen")) if upd["repeat_count"] is not None else None
        upd["status_ts"] = r.ts
    for r in batch.online:
        m, upd = r.message, touch(r, "online")
        online = m.get("online")
        if not isinstance(online, bool):
            online = m.get("state") == "online"
        upd["online"] = 1 if online else 0
        upd["online_ts"] = r.ts
    for r in batch.events:
        m, upd = r.message, touch(r, "event")
        upd["last_event"] = as_text(m.get("type"))
        upd["last_event_ts"] = r.ts
        if m.get("type") in _ERROR_EVENTS:  # the latest refusal or failure, until a success
            upd["last_error"] = _last_error(m)
        elif m.get("type") == "sync_succeeded":
            upd["last_error"] = None
    for r in batch.health:
        touch(r)
    return updates


def device_row_groups(
        updates: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """The column updates of :func:`device_updates` as rows grouped by the columns they set (one
    statement each): every row holds those columns, ``last_seen`` and ``id``; a status or event row
    holds its time column (:data:`GUARDS`), which the writer compares with the stored one. A device
    seen only through health samples gets a row of ``last_seen`` alone."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for upd in updates.values():
        parts = [upd[p] for p in ("status", "online", "event") if p in upd] or [{}]
        for part in parts:
            row = {**part, "last_seen": upd["last_seen"], "id": upd["id"]}
            groups.setdefault(tuple(row), []).append(row)
    return groups


def guard_of(columns: Sequence[str]) -> str | None:
    """The time column among ``columns`` that guards their update (:data:`GUARDS`), or None."""
    return next((c for c in GUARDS if c in columns), None)


def event_commits(events: Sequence[Received]) -> list[str]:
    """The distinct release commits the events name, sorted (to look their commit times up)."""
    return sorted({c for r in events if isinstance(c := r.message.get("commit"), str)})


def event_rows(events: Sequence[Received], committed: Mapping[str, float]) -> list[dict[str, Any]]:
    """The event rows of a batch; ``committed`` maps a known release commit to its commit time."""
    rows = []
    for r in events:
        m = r.message
        commit = m.get("commit") if isinstance(m.get("commit"), str) else None
        detail = {k: v for k, v in m.items() if k not in _EVENT_ENVELOPE}
        rows.append({
            "device": str(m["device"]), "ts": r.ts,
            "received_at": r.received_at, "type": as_text(m.get("type")) or "unknown", "commit": commit,
            "release": as_int(m.get("release")), "reason": as_text(m.get("reason")),
            "step": as_text(m.get("step")), "detail": to_json(detail) if detail else None,
            "committed_at": committed.get(commit) if commit else None,
        })
    return rows


def health_row(r: Received) -> dict[str, Any]:
    """The health-sample row of one message (its metrics, or the message's other keys, and checks)."""
    m = r.message
    metrics = m.get("metrics")
    if metrics is None:
        metrics = {k: v for k, v in m.items() if k not in {"schema", "device", "ts", "checks", "kind"}}
    return {"device": str(m["device"]), "ts": r.ts,
            "received_at": r.received_at, "metrics": to_json(metrics), "checks": to_json(m.get("checks"))}
