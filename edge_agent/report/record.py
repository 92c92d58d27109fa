"""The record step: write what an operation did to the state database and queue its reports.

Every local event (``StateDB.add_event``), every outbox message and the retained status are written
here, built by :mod:`edge_agent.report.build`. A failed sync goes through
:mod:`edge_agent.repeats` first: the same failure for the same commit is recorded and reported
once, later ones only raise ``repeat_count``/``last_seen`` in the status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from edge_agent import repeats
from edge_agent.config import AgentConfig
from edge_agent.report import build
from edge_agent.results import SyncResult
from edge_agent.state import StateDB
from edge_core import messages
from edge_core.errors import MessageError
from edge_core.logs import release_words

__all__ = [
    "META_DRIFT",
    "META_PAUSED",
    "META_REMOTE_PAUSED",
    "META_SYNC_STATE",
    "drift_state",
    "event_message",
    "event_payload",
    "finish",
    "pause_reason",
    "queue_started",
    "queue_status",
    "record",
    "set_drift",
]

log = logging.getLogger(__name__)

META_PAUSED = "paused"
"""The reason of the device's own pause (``edge-agent pause``), absent when not paused."""
META_REMOTE_PAUSED = "remote_paused"
"""The reason of the fleet server's pause (its retained ``control`` message), absent when not paused."""
META_SYNC_STATE = "report.sync_state"
META_DRIFT = "report.drift"


def event_message(config: AgentConfig, kind: str, *, now: datetime, commit: str | None,
                  release: int | None, reason: str | None, **extra: Any) -> dict[str, Any]:
    """Return the ``events`` message of one local event kind (see :func:`event_payload`).

    Raises:
        MessageError: an unknown kind (or an outcome that sends no event) or an invalid field.
    """
    device = config.device_id
    if kind.startswith("sync_"):
        msg = build.sync_event(device, outcome=kind.removeprefix("sync_"), commit=commit, release=release,
                               ts=now, reason=reason, step=extra.get("step"),
                               changes=int(extra.get("changes", 0)))
        if msg is None:
            raise MessageError("bad_field", f"the sync outcome of {kind!r} is not reported as an event")
        return msg
    if kind in ("drift_detected", "drift_corrected"):
        return build.drift_event(device, corrected=kind == "drift_corrected",
                                 resources=list(extra.get("resources", ())), commit=commit, release=release,
                                 ts=now, mode=config.mode)
    if kind in ("paused", "resumed"):
        return build.pause_event(device, paused=kind == "paused", reason=reason, commit=commit,
                                 release=release, ts=now)
    if kind == "recovered":
        return build.recovery_event(device, status=str(extra.get("status", "rolled_back")), reason=reason,
                                    commit=commit, release=release, ts=now)
    raise MessageError("bad_field", f"unknown event kind {kind!r}")


def event_payload(config: AgentConfig, kind: str, *, now: datetime, commit: str | None,
                  release: int | None, reason: str | None, **extra: Any) -> bytes:
    """Return the JSON bytes of one ``<prefix>/<device>/events`` message.

    ``kind`` is a local event kind: ``sync_<outcome>`` (``extra``: ``step``, ``changes``),
    ``drift_detected`` / ``drift_corrected`` (``extra``: ``resources``), ``paused``, ``resumed`` or
    ``recovered`` (``extra``: ``status``).

    Raises:
        MessageError: an unknown kind (or an outcome that sends no event) or an invalid field.
    """
    return messages.encode(event_message(config, kind, now=now, commit=commit, release=release, reason=reason,
                                         **extra))


def record(state: StateDB, config: AgentConfig, kind: str, *, now: datetime, commit: str | None,
           release: int | None, reason: str | None, **extra: Any) -> None:
    """Add one event to the local history and queue its report (see :func:`event_payload`)."""
    state.add_event(kind, {"commit": commit, "release": release, "reason": reason, **extra})
    msg = event_message(config, kind, now=now, commit=commit, release=release, reason=reason, **extra)
    build.queue_report(state, config.mqtt_prefix, "events", msg)


def queue_started(state: StateDB, config: AgentConfig, *, now: datetime, commit: str, release: int,
                  changes: int) -> None:
    """Queue the ``sync_started`` event of an apply about to make ``changes`` changes."""
    msg = build.started_event(config.device_id, commit=commit, release=release, ts=now, changes=changes)
    build.queue_report(state, config.mqtt_prefix, "events", msg)


def drift_state(state: StateDB) -> dict[str, Any]:
    """Return the last drift summary recorded for the status."""
    text = state.get_meta(META_DRIFT)
    if text:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
    return build.drift_summary((), corrected=False)


def set_drift(state: StateDB, ids: Sequence[str], *, corrected: bool, clean: bool,
              differs: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Remember the last drift summary for the status (with what differs per resource, when given);
    ``clean``: the device matches the release."""
    state.set_meta(META_DRIFT, json.dumps(build.drift_summary(ids, corrected=corrected, differs=differs)))
    current = state.get_meta(META_SYNC_STATE)
    if not clean:
        state.set_meta(META_SYNC_STATE, "drifted")
    elif current in (None, "drifted"):
        state.set_meta(META_SYNC_STATE, "in_sync")


def pause_reason(state: StateDB) -> str | None:
    """Why the device is paused, or None when it is not: its own pause (``edge-agent pause``), the
    fleet server's (``fleet server: <reason>``), or both. Either one stops it applying changes."""
    local, remote = state.get_meta(META_PAUSED), state.get_meta(META_REMOTE_PAUSED)
    parts = ([local] if local else []) + ([f"fleet server: {remote}"] if remote else [])
    return "; ".join(parts)[:1100] if parts else None


def queue_status(state: StateDB, config: AgentConfig, now: datetime) -> None:
    """Queue the retained status: installed release, sync state, drift summary, paused, labels,
    profile, and while the last sync failed how often in a row (``repeat_count``, ``last_seen``)."""
    installed = state.installed()
    failure = repeats.load(state)
    paused = pause_reason(state)
    msg = build.status_report(
        config.device_id, commit=installed.commit if installed else None,
        release=installed.version if installed else None,
        sync_state=state.get_meta(META_SYNC_STATE) or "unknown", drift=drift_state(state),
        paused=paused is not None, ts=now, labels=config.labels, profile=config.profile,
        repeat_count=failure.count if failure is not None else None,
        last_seen=failure.last_seen if failure is not None else None, pause_reason=paused)
    build.queue_report(state, config.mqtt_prefix, "status", msg)


def finish(state: StateDB, config: AgentConfig, result: SyncResult, now: datetime, *,
           quiet: bool = False) -> SyncResult:
    """Record the outcome of a sync: event (once per distinct failure), sync state, status, log line.

    ``quiet`` leaves out the event (a noop or pause of the release already installed). Returns the
    result with its ``repeat_count``.
    """
    failure = repeats.note(state, result, now, base=config.backoff.base, cap=config.backoff.cap)
    count = failure.count if failure is not None else 0
    if count > 1:
        quiet = True
    if not quiet:
        state.add_event("sync_" + result.outcome, {"commit": result.commit, "release": result.version,
                                                   "reason": result.reason, "step": result.step,
                                                   "changes": result.changes, "source": result.origin})
        event = build.sync_event(config.device_id, outcome=result.outcome, commit=result.commit,
                                 release=result.version, ts=now, reason=result.reason, step=result.step,
                                 changes=result.changes, origin=result.origin)
        if event is not None:
            build.queue_report(state, config.mqtt_prefix, "events", event)
    state.set_meta(META_SYNC_STATE, build.SYNC_STATES.get(result.outcome, result.outcome))
    if result.outcome in ("applied", "noop"):
        state.set_meta(META_DRIFT, json.dumps(build.drift_summary((), corrected=False)))
    queue_status(state, config, now)
    level = logging.INFO if result.outcome in ("applied", "noop", "paused") or count > 1 else logging.WARNING
    again = f" (again, {count} times in a row)" if count > 1 else ""
    log.log(level, "sync %s: %s changes %s%s%s", result.outcome, release_words(result.version, result.commit),
            result.changes, f" ({result.reason})" if result.reason else "", again)
    return SyncResult(result.outcome, result.version, result.commit, reason=result.reason, step=result.step,
                      changes=result.changes, repeat_count=count, held=result.held, origin=result.origin)
