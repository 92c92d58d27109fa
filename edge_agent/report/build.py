"""Every report the agent sends, built and queued in the outbox (the builders of the report package).

* **Builders** (pure, data and time in, a validated message out): :func:`sync_event` maps a sync
  outcome to its event, :func:`started_event`, :func:`drift_event`, :func:`pause_event`,
  :func:`recovery_event`, :func:`status_report` and :func:`health_report`. Every one goes through
  :mod:`edge_core.messages`, so the fleet server's decoder accepts what the device sends.
  :func:`queue_report` encodes a message and writes it to the outbox (the state database) with
  the QoS, retain flag and outbox class of its kind; nothing is ever sent without being queued
  first. Sending is :mod:`edge_agent.report.service`'s job; recording is
  :mod:`edge_agent.report.record`'s.

Outcome to event type: ``applied``/``noop`` -> ``sync_succeeded`` (``detail.outcome`` says which,
``detail.changes`` how many changes), ``refused`` -> ``sync_refused``, ``rolled_back`` ->
``sync_rolled_back`` (``step``, ``reason``), ``failed``/``fetch_failed`` -> ``sync_failed``
(``detail.outcome`` keeps which). ``paused`` sends no event: the ``paused`` event was sent when the
device was paused, and the status says ``paused``.

Outbox classes (what a full outbox drops first, see ``StateDB.outbox_put``): sync outcomes, pause
and resume are ``outcome`` (never dropped); ``sync_started`` and drift events are ``event``; status
is ``status`` (only superseded ones are dropped); health is ``health`` (dropped first).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from edge_agent.engine.health import CheckResult
from edge_agent.state import StateDB
from edge_core import messages
from edge_core.errors import MessageError

__all__ = [
    "DRIFT_RESOURCES_MAX",
    "SYNC_STATES",
    "drift_event",
    "drift_summary",
    "health_report",
    "pause_event",
    "queue_report",
    "recovery_event",
    "started_event",
    "status_report",
    "sync_event",
]

log = logging.getLogger(__name__)

SYNC_STATES: Mapping[str, str] = {
    "applied": "in_sync",
    "noop": "in_sync",
    "rolled_back": "rolled_back",
    "failed": "failed",
    "refused": "refused",
    "fetch_failed": "fetch_failed",
    "paused": "paused",
}
"""Sync outcome -> the ``sync_state`` of the status report (``unknown`` before the first sync,
``drifted`` while uncorrected drift is known)."""

DRIFT_RESOURCES_MAX = 20
"""How many drifted resource ids a drift event or the status names (the count is always exact)."""

_OUTCOME_EVENTS = {
    "applied": "sync_succeeded",
    "noop": "sync_succeeded",
    "refused": "sync_refused",
    "rolled_back": "sync_rolled_back",
    "failed": "sync_failed",
    "fetch_failed": "sync_failed",
}
_MAX_REASON = 2000
_MAX_STEP = 64

Ts = datetime | float


def _clip(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- builders ------------------------------------------------------------------------------------


def sync_event(device: str, *, outcome: str, commit: str | None, release: int | None, ts: Ts,
               reason: str | None = None, step: str | None = None, changes: int = 0,
               origin: str | None = None) -> dict[str, Any] | None:
    """Return the event reporting one sync outcome, or None for an outcome that sends none (``paused``);
    ``origin`` (``file``: an imported bundle) goes to ``detail.source``.

    Raises:
        MessageError: a field is invalid (``bad_field``), e.g. an unknown outcome.
    """
    if outcome == "paused":
        return None
    kind = _OUTCOME_EVENTS.get(outcome)
    if kind is None:
        raise MessageError("bad_field", f"unknown sync outcome {outcome!r}")
    detail: dict[str, Any] = {"outcome": outcome}
    if outcome in ("applied", "noop", "rolled_back"):
        detail["changes"] = int(changes)
    if origin is not None:
        detail["source"] = origin
    return messages.event_message(device, type=kind, commit=commit, release=release, ts=ts,
                                  reason=_clip(reason, _MAX_REASON), step=_clip(step, _MAX_STEP),
                                  detail=detail)


def started_event(device: str, *, commit: str, release: int, ts: Ts, changes: int) -> dict[str, Any]:
    """Return ``sync_started``: a verified release is about to be applied with ``changes`` changes.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return messages.event_message(device, type="sync_started", commit=commit, release=release, ts=ts,
                                  detail={"changes": int(changes)})


def drift_summary(resources: Sequence[str], *, corrected: bool,
                  differs: Mapping[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Return the short drift summary used in drift events and the status: resource ids, never content;
    with ``differs`` (id -> what was expected, what was found: the drivers' short descriptions, secret
    content redacted) each resource is ``{id, expected, found}`` instead, for the status."""
    ids = list(resources)
    shown: list[Any] = ids[:DRIFT_RESOURCES_MAX]
    if differs is not None:
        shown = [{"id": r, "expected": differs[r][0], "found": differs[r][1]} if r in differs else r
                 for r in shown]
    return {"count": len(ids), "corrected": corrected, "resources": shown}


def drift_event(device: str, *, corrected: bool, resources: Sequence[str], commit: str | None,
                release: int | None, ts: Ts, mode: str) -> dict[str, Any]:
    """Return ``drift_detected`` (``corrected=False``) or ``drift_corrected`` for these resource ids.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    detail = {**drift_summary(resources, corrected=corrected), "mode": mode}
    return messages.event_message(device, type="drift_corrected" if corrected else "drift_detected",
                                  commit=commit, release=release, ts=ts, detail=detail)


def pause_event(device: str, *, paused: bool, reason: str | None, commit: str | None, release: int | None,
                ts: Ts) -> dict[str, Any]:
    """Return ``paused`` (with the operator's reason) or ``resumed``.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return messages.event_message(device, type="paused" if paused else "resumed", commit=commit,
                                  release=release, ts=ts, reason=_clip(reason, _MAX_REASON))


def recovery_event(device: str, *, status: str, reason: str | None, commit: str | None, release: int | None,
                   ts: Ts) -> dict[str, Any]:
    """Return the report of a crash recovery: ``sync_rolled_back`` at step ``recovery`` (``sync_failed``
    when the undo itself failed).

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    kind = "sync_rolled_back" if status == "rolled_back" else "sync_failed"
    return messages.event_message(device, type=kind, commit=commit, release=release, ts=ts,
                                  reason=_clip(reason, _MAX_REASON), step="recovery",
                                  detail={"outcome": status})


def status_report(device: str, *, commit: str | None, release: int | None, sync_state: str,
                  drift: Mapping[str, Any], paused: bool, ts: Ts, labels: Mapping[str, str] | None = None,
                  profile: str | None = None, repeat_count: int | None = None,
                  last_seen: Ts | None = None, pause_reason: str | None = None) -> dict[str, Any]:
    """Return the retained status: the installed release, the sync state, the drift summary, paused, and
    the device's ``labels`` and ``profile`` (from ``agent.yaml``; each left out when None); while the
    last sync failed, how many syncs in a row failed the same way and when the last one did.

    Labels outside the message's bounds (more than ``messages.MAX_LABELS``, a value longer than
    ``messages.MAX_LABEL_VALUE``) are left out with a warning rather than failing the report: the
    status still says what the device runs, and the fleet server keeps the labels it had.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    sent_labels: dict[str, str] | None = None
    if labels is not None:
        try:
            sent_labels = messages.validate_labels(labels)
        except MessageError as exc:
            log.warning("the status of %s leaves out its labels: %s", device, exc)
    return messages.status_message(device, commit=commit, release=release, sync_state=sync_state,
                                   drift=dict(drift), paused=paused, ts=ts, labels=sent_labels,
                                   profile=profile, repeat_count=repeat_count, last_seen=last_seen,
                                   pause_reason=pause_reason)


def _check_dict(result: CheckResult) -> dict[str, Any]:
    return {"name": result.name[:256] or "check", "ok": result.ok, "bundle": result.bundle[:256],
            "kind": result.kind[:64], "detail": _clip(result.detail, 2048) or "",
            "duration": max(0.0, float(result.duration))}


def health_report(device: str, *, commit: str | None, release: int | None, ts: Ts, metrics: Mapping[str, Any],
                  checks: Sequence[CheckResult]) -> dict[str, Any]:
    """Return one health report: device metrics (see ``telemetry.sample``) and health-check results.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return messages.health_message(device, commit=commit, release=release, ts=ts, metrics=dict(metrics),
                                   checks=[_check_dict(c) for c in checks[:256]])


# kind -> (qos, retain, outbox class); an event's class depends on its type (_EVENT_CLASSES), and a
# preflight's plan may be dropped like an event when the outbox is full
_DELIVERY = {"status": (1, True, "status"), "events": (1, False, "outcome"), "health": (1, False, "health"),
             "plan": (1, False, "event")}
_EVENT_CLASSES = {"sync_started": "event", "drift_detected": "event", "drift_corrected": "event"}


def queue_report(state: StateDB, prefix: str, kind: str, msg: Mapping[str, Any]) -> int:
    """Encode ``msg`` (a ``status``, ``events``, ``health`` or ``plan`` message) and write it to the outbox.

    Returns the outbox id. The topic is ``<prefix>/<msg device>/<kind>``.

    Raises:
        MessageError: unknown kind, or the message cannot be encoded.
        StateError: the outbox cannot be written.
    """
    delivery = _DELIVERY.get(kind)
    if delivery is None:
        raise MessageError("bad_field", f"the agent does not send {kind!r} reports")
    qos, retain, cls = delivery
    if kind == "events":
        cls = _EVENT_CLASSES.get(str(msg.get("type")), cls)
    topic = messages.topic(prefix, str(msg.get("device")), kind)
    return state.outbox_put(topic, messages.encode(dict(msg)), qos=qos, retain=retain, cls=cls)
