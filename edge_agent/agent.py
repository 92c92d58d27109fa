"""The agent's operations, one call each: sync a release, show a plan, check drift, pause, report status.

A thin shell: each operation takes the apply lock where it needs it, builds one
:class:`~edge_agent.runtime.Runtime` (source, state, runner, clock), hands it to the module that
does the work, and closes it. A sync is the straight pipeline of :mod:`edge_agent.sync`
(fetch -> verify -> select -> plan -> apply -> record -> report); recording and reports are
:mod:`edge_agent.report.record`'s.

A paused device (``edge-agent pause``) still fetches and verifies, so it keeps its rollback floor
current, but applies nothing: the outcome is ``paused``.

Outcomes: ``applied`` | ``noop`` | ``rolled_back`` | ``failed`` | ``refused`` | ``fetch_failed`` |
``paused``. A failure repeated for the same commit is recorded once and counted, and a release that
failed here is held (:mod:`edge_agent.repeats`).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent import repeats, selection, telemetry
from edge_agent.config import AgentConfig
from edge_agent.engine.health import CheckResult, run_checks
from edge_agent.engine.plan import make_plan, plan_document, render_plan
from edge_agent.engine.transaction import recover
from edge_agent.planning import Prepared, desired_for, prepare
from edge_agent.prefetch import Prefetched, open_source
from edge_agent.report import build, record
from edge_agent.report.record import event_payload
from edge_agent.results import DriftReport, SyncResult
from edge_agent.runner import CommandEnv
from edge_agent.runtime import (
    LOCK_FILE,
    STATE_DB,
    Runtime,
    apply_lock,
    open_runtime,
    open_state,
    with_payloads,
)
from edge_agent.state import StateDB
from edge_agent.sync import META_TREE, apply_prepared, run_sync
from edge_agent.verification import SyncCache, fetch_and_verify, tree_digest
from edge_core.errors import ConfigError, FetchError, StateError
from edge_core.logs import log_context
from edge_core.release import DesiredState

__all__ = [
    "LOCK_FILE",
    "STATE_DB",
    "DriftReport",
    "SyncCache",
    "SyncResult",
    "apply_lock",
    "assigned_revision",
    "check_drift",
    "event_payload",
    "import_release",
    "pause",
    "plan_only",
    "recover_interrupted",
    "report_health",
    "resume",
    "set_assigned_revision",
    "set_remote_pause",
    "status",
    "sync_in",
    "sync_once",
]

log = logging.getLogger(__name__)

_MAX_MOUNTS = 16


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _iso(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sync_once(config: AgentConfig, *, want: str | None = None, now: datetime | None = None,
              cache: SyncCache | None = None, assigned: str | None = None,
              prefetched: Prefetched | None = None) -> SyncResult:
    """Run one fetch -> verify -> select -> plan -> apply -> record cycle (:mod:`edge_agent.sync`).

    Args:
        config: the validated agent configuration.
        want: a commit the device's operator asks for; None means what
            :func:`edge_agent.selection.choose` picks: the revision the fleet server assigned
            (``assigned``, else :func:`assigned_revision`), else the fleet baseline, else the branch
            head. It must pass every trust check either way, and only ``want`` or an assignment may
            be older than the installed release. ``want`` also releases a hold on a release that
            failed here (:mod:`edge_agent.repeats`).
        now: the time used for expiry checks and timestamps (default: the clock).
        cache: the daemon's :class:`SyncCache` (None: verify everything from scratch).
        assigned: the revision the fleet server assigned, as the daemon follows it (None: the
            persisted one).
        prefetched: the daemon's fetch of the target (:func:`edge_agent.selection.target_for`),
            done before the apply lock was taken; used only when it fetched the revision chosen here.

    Raises:
        LockedError: another apply is running.
        ConfigError: the device profile cannot be loaded.
        StateError: the state database cannot be used.
    """
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config)
        try:
            return sync_in(rt, want=want, now=now, cache=cache, assigned=assigned, prefetched=prefetched)
        finally:
            rt.close()


def sync_in(rt: Runtime, *, want: str | None = None, now: datetime | None = None,
            cache: SyncCache | None = None, assigned: str | None = None, prefetched: Prefetched | None = None,
            origin: str | None = None) -> SyncResult:
    """Run one sync with a runtime the caller built and closes (:func:`sync_once` holds the lock for it).

    Raises:
        StateError: the state database cannot be used.
    """
    target = selection.target_in(rt.state, want=want, assigned=assigned)
    return run_sync(rt, target, now=now, cache=cache, prefetched=prefetched, origin=origin)


def import_release(config: AgentConfig, path: Path, *, now: datetime | None = None) -> SyncResult:
    """Apply the signed release in a bundle file (``fleetctl release export``), as a sync of that
    commit would: the file is read into the repository cache within the fetch's size and time
    limits, then verified, selected, planned, applied and recorded exactly like a fetched release
    (as ``edge-agent sync --want COMMIT`` does); its reports say ``source: file``, and wait in the
    outbox until the device is online. A file that cannot be used ends as ``fetch_failed``.

    Raises:
        LockedError: another apply is running.
        ConfigError: the repo section or the device profile cannot be used.
        StateError: the state database cannot be used.
    """
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config)
        try:
            when = _now(now)
            source = open_source(config)
            try:
                fetched = source.import_bundle(path)
            except FetchError as exc:
                failed = SyncResult("fetch_failed", reason=str(exc), origin="file")
                return record.finish(rt.state, config, failed, when)
            finally:
                source.close()
            log.info("release %s read from %s", fetched.commit, path)
            return sync_in(rt, want=fetched.commit, now=when,
                           prefetched=Prefetched(want=fetched.commit, result=fetched), origin="file")
        finally:
            rt.close()


def recover_interrupted(config: AgentConfig, *, now: datetime | None = None) -> None:
    """Undo a transaction a crash left open and record it, as the first step of every sync does (the
    daemon calls it at start, before its first fetch, so no drift check meets a half-applied release).

    Raises:
        LockedError: another apply is running (it recovers first itself).
        ConfigError: the device profile cannot be loaded.
        StateError: the state database cannot be used.
    """
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config)
        try:
            recovered = recover(rt.state, rt.ctx)
            if recovered is not None:
                record.record(rt.state, config, "recovered", now=_now(now), commit=None, release=None,
                              reason=recovered.reason, status=recovered.status)
        finally:
            rt.close()


def plan_only(config: AgentConfig, *, want: str | None = None, now: datetime | None = None,
              as_json: bool = False) -> str:
    """Fetch, verify, select and plan; return the plan as readable text (one JSON document when
    ``as_json``). Changes nothing on the device.

    It holds the apply lock like a sync; its fetch holds the cache's fetch lock like every fetch.

    Raises:
        LockedError: a sync holds the apply lock (try again when it is done).
        FetchError: the mirror cannot be reached.
        UntrustedInputError: the release fails verification or selection.
        DriverUnavailable: the release uses a kind whose driver cannot work here.
    """
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config, diffs=True)
        try:
            verified = fetch_and_verify(rt, want, _now(now))
            desired = desired_for(rt, verified.tree)
            plan = prepare(rt, desired, verified.release.version, verified.commit).plan
            if as_json:
                return json.dumps({"release": verified.release.version, "commit": verified.commit,
                                   **plan_document(plan)}, indent=2, sort_keys=True)
            header = f"release {verified.release.version} commit {verified.commit}\n"
            return header + render_plan(plan)
        finally:
            rt.close()


def _installed_desired(rt: Runtime, cache: SyncCache | None = None) -> tuple[DesiredState, int, str] | None:
    """Return the desired state of the installed release: the daemon's ``cache`` when it holds the
    installed commit (verified and parsed by the sync that installed it), else rebuilt from the
    local repository cache."""
    installed = rt.state.installed()
    if installed is None:
        return None
    hit = None if cache is None else cache.verified
    if cache is not None and hit is not None and cache.desired is not None and hit.commit == installed.commit:
        return cache.desired, installed.version, installed.commit
    tree = rt.source.read_tree(installed.commit)
    if tree_digest(tree) != rt.state.get_meta(META_TREE):
        raise StateError(f"the cached tree of commit {installed.commit} no longer matches what was verified")
    return desired_for(rt, tree), installed.version, installed.commit


def check_drift(config: AgentConfig, *, now: datetime | None = None,
                cache: SyncCache | None = None) -> DriftReport:
    """Compare the device with the installed release; in enforce mode correct it in a transaction.

    ``cache``: the daemon's :class:`SyncCache`; when it holds the installed commit, its desired
    state is used instead of reading and parsing the release again.

    Drift is recorded in the state (``add_drift``), as an event and an outbox message
    (``drift_detected``, then ``drift_corrected`` when enforce mode fixed it), followed by the
    status report. A paused device or ``audit`` mode only records. Nothing is done when no release
    is installed yet; a clean check reports a new status only when drift had been reported before.

    Raises:
        LockedError: an apply is running (try again at the next drift interval).
        StateError: the state or the repository cache cannot be read.
    """
    from edge_agent.engine.drift import detect_drift  # noqa: PLC0415 - a sync never needs it

    when = _now(now)
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config)
        try:
            loaded = _installed_desired(rt, cache)
            if loaded is None:
                return DriftReport((), False)
            desired, version, commit = loaded
            with log_context(commit=commit, release=version):
                ctx = with_payloads(rt.ctx, desired.payloads, version, commit)
                managed = rt.state.managed()
                findings = tuple(detect_drift(desired, managed, ctx))
                if not findings:
                    if record.drift_state(rt.state).get("count"):
                        record.set_drift(rt.state, (), corrected=False, clean=True)
                        record.queue_status(rt.state, config, when)
                    return DriftReport((), False)
                enforce = config.mode == "enforce" and record.pause_reason(rt.state) is None
                outcome: SyncResult | None = None
                if enforce:
                    prepared = Prepared(desired, ctx, managed, make_plan(desired, managed, ctx))
                    outcome = apply_prepared(rt, prepared, version=version, commit=commit)
                corrected = outcome is not None and outcome.outcome in ("applied", "noop")
                for f in findings:
                    rt.state.add_drift(f.resource_id, f.expected, f.found, corrected)
                ids = [f.resource_id for f in findings]
                record.record(rt.state, config, "drift_detected", now=when, commit=commit, release=version,
                              reason=None, resources=ids)
                if corrected:
                    record.record(rt.state, config, "drift_corrected", now=when, commit=commit,
                                  release=version, reason=None, resources=ids)
                record.set_drift(rt.state, ids, corrected=corrected, clean=corrected,
                                 differs={f.resource_id: (f.expected, f.found) for f in findings})
                record.queue_status(rt.state, config, when)
                log.warning("drift in %s resource(s): %s; corrected=%s", len(ids), ", ".join(ids), corrected)
                return DriftReport(findings, corrected, outcome.outcome if outcome is not None else None)
        finally:
            rt.close()


def _set_pause(config: AgentConfig, reason: str | None, now: datetime | None, *,
               key: str = record.META_PAUSED) -> bool:
    """Set (a reason) or clear (None) one of the two pauses, ``key``; record and report the change.
    Return False, doing nothing, when that pause already stood so."""
    when = _now(now)
    remote = key == record.META_REMOTE_PAUSED
    with log_context(device=config.device_id):
        state = open_state(config)
        try:
            if remote and (state.get_meta(key) or None) == reason:
                return False  # the retained message again, after a reconnect
            installed = state.installed()
            commit = installed.commit if installed else None
            version = installed.version if installed else None
            kind = "paused" if reason is not None else "resumed"
            state.set_meta(key, reason)
            said = f"fleet server: {reason}" if remote and reason is not None else reason
            if remote and reason is None:
                said = "fleet server"
            record.record(state, config, kind, now=when, commit=commit, release=version, reason=said)
            record.queue_status(state, config, when)
            still = record.pause_reason(state)
            log.warning("%s%s%s", kind, f" ({said})" if said else "",
                        f"; still paused: {still}" if reason is None and still else "")
            return True
        finally:
            state.close()


def pause(config: AgentConfig, reason: str, *, now: datetime | None = None) -> None:
    """Stop applying and enforcing (break-glass); recorded as an event and reported.

    Raises:
        ConfigError: the reason is empty.
        StateError: the state database cannot be written.
    """
    if not reason.strip():
        raise ConfigError("pause: a reason is required")
    _set_pause(config, reason.strip(), now)


def resume(config: AgentConfig, *, now: datetime | None = None) -> None:
    """Apply and enforce again after :func:`pause`; recorded as an event and reported.

    Raises:
        StateError: the state database cannot be written.
    """
    _set_pause(config, None, now)


def set_remote_pause(config: AgentConfig, reason: str | None, *, now: datetime | None = None) -> bool:
    """Take the fleet server's pause (``reason``) or its lifting (None), from its retained ``control``
    message. It composes with the device's own pause: the device applies changes only while neither
    stands. Return whether anything changed (a repeated message changes nothing).

    Raises:
        StateError: the state database cannot be written.
    """
    return _set_pause(config, (reason.strip() or "no reason given") if reason is not None else None, now,
                      key=record.META_REMOTE_PAUSED)


def assigned_revision(config: AgentConfig) -> str | None:
    """Return the revision the fleet server assigned (persisted), or None to follow the branch head.

    Raises:
        StateError: the state database cannot be read.
    """
    if not (config.state_dir / STATE_DB).exists():
        return None
    state = StateDB(config.state_dir / STATE_DB)
    try:
        return state.get_meta(selection.META_ASSIGNED) or None
    finally:
        state.close()


def set_assigned_revision(config: AgentConfig, revision: str | None) -> None:
    """Persist the revision the fleet server assigned (None: follow the branch head again).

    :func:`sync_once` without ``want`` syncs to it; it still has to pass every trust check. A new
    assignment of a release held after it failed here releases the hold (:mod:`edge_agent.repeats`).

    Raises:
        StateError: the state database cannot be written.
    """
    state = open_state(config)
    try:
        if (state.get_meta(selection.META_ASSIGNED) or None) != revision:
            repeats.release_hold(state, revision)
        state.set_meta(selection.META_ASSIGNED, revision)
    finally:
        state.close()


def _mount_point(path: Path) -> str:
    """Return the mount point of the filesystem holding ``path`` (its nearest existing ancestor)."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return str(current)


def _health_mounts(config: AgentConfig, desired: DesiredState | None) -> list[str]:
    """``/`` plus the mount points of the managed paths (under ``root``), at most ``_MAX_MOUNTS``."""
    mounts = {"/", _mount_point(config.root)}
    if desired is not None:
        for res in desired.resources:
            for path in res.paths:
                mounts.add(_mount_point(config.root / path.lstrip("/")))
                if len(mounts) >= _MAX_MOUNTS:
                    return sorted(mounts)
    return sorted(mounts)


def report_health(config: AgentConfig, *, now: datetime | None = None,
                  cache: SyncCache | None = None) -> list[CheckResult]:
    """Run the installed release's health checks and queue one health report with device metrics.

    ``cache``: the daemon's :class:`SyncCache`, used as :func:`check_drift` does.

    Metrics come from ``telemetry.sample`` for ``/`` and the mounts of the managed paths. Each check
    is bounded by its own timeout; before the first release there are no checks. Holds the apply lock
    so that checks never watch a half-applied release.

    Raises:
        LockedError: an apply is running (report at the next health interval).
        StateError: the state or the repository cache cannot be read.
    """
    when = _now(now)
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = open_runtime(config)
        try:
            loaded = _installed_desired(rt, cache)
            desired = loaded[0] if loaded is not None else None
            who = CommandEnv(config.device_id, loaded[1], loaded[2]) if loaded is not None else None
            results = run_checks(desired.checks, rt.runner, config.root, who) if desired is not None else []
            metrics = telemetry.sample(_health_mounts(config, desired))
            msg = build.health_report(config.device_id, commit=loaded[2] if loaded else None,
                                         release=loaded[1] if loaded else None, ts=when, metrics=metrics,
                                         checks=results)
            build.queue_report(rt.state, config.mqtt_prefix, "health", msg)
            return results
        finally:
            rt.close()


def _last_sync(state: StateDB) -> dict[str, Any] | None:
    for event in state.recent_events(200):
        if event.kind.startswith("sync_"):
            ts = datetime.fromtimestamp(event.at, UTC)
            return {"kind": event.kind, "ts": _iso(ts), "detail": event.detail.get("reason") or "ok",
                    "commit": event.detail.get("commit"), "release": event.detail.get("release")}
    return None


def status(config: AgentConfig) -> dict[str, Any]:
    """Return what the device runs and how it is doing, as a JSON-able dict.

    Raises:
        StateError: the state database cannot be read.
    """
    state_dir = config.state_dir
    out: dict[str, Any] = {"device": config.device_id, "mode": config.mode, "profile": config.profile,
                           "labels": dict(config.labels), "repo": config.repo.url,
                           "branch": config.repo.branch}
    if not (state_dir / STATE_DB).exists():
        out.update({"installed": None, "floor": 0, "paused": None, "paused_locally": None,
                    "paused_by_fleet_server": None, "managed": 0, "open_transaction": None,
                    "last_sync": None, "outbox": 0})
        return out
    state = StateDB(state_dir / STATE_DB)
    try:
        installed = state.installed()
        open_txn = state.open_txn()
        out.update({
            "installed": None if installed is None else {
                "version": installed.version, "commit": installed.commit, "bundles": list(installed.bundles)},
            "floor": state.floor(),
            "paused": record.pause_reason(state),
            "paused_locally": state.get_meta(record.META_PAUSED) or None,
            "paused_by_fleet_server": state.get_meta(record.META_REMOTE_PAUSED) or None,
            "managed": len(state.managed()),
            "open_transaction": None if open_txn is None else open_txn.txn_id,
            "last_sync": _last_sync(state),
            "outbox": state.outbox_count(),
        })
    finally:
        state.close()
    return out
