"""One sync as a straight pipeline: fetch -> verify -> select -> plan -> apply -> record -> report.

Each step is one call into one module, and none calls back into :mod:`edge_agent.agent`:

==========  =========================================================================================
recover     :func:`edge_agent.engine.transaction.recover` (undo what a crash left open)
fetch       :func:`edge_agent.verification.fetch_and_verify` (via the runtime's source)
verify      the same call: :func:`edge_core.trust.verify.verify_tree`; then the monotonic rule of
            :func:`edge_agent.selection.check_monotonic` and the hold of :func:`edge_agent.repeats.held`
select/plan :func:`edge_agent.planning.prepare` (bundles for this device, probe once, plan)
apply       :func:`edge_agent.engine.transaction.apply_plan` (journal, backup, apply, health checks)
record      :func:`edge_agent.report.record.finish` (state, event once per distinct failure, status)
report      the outbox; :mod:`edge_agent.report.service` sends it
==========  =========================================================================================

The caller holds the apply lock and owns the :class:`~edge_agent.runtime.Runtime`.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import replace
from datetime import datetime

from edge_agent import repeats, selection
from edge_agent.engine.health import run_checks
from edge_agent.engine.transaction import apply_plan, recover
from edge_agent.planning import Prepared, desired_for, prepare
from edge_agent.prefetch import Prefetched
from edge_agent.report import record
from edge_agent.results import SyncResult
from edge_agent.runtime import Runtime
from edge_agent.verification import SyncCache, Verified, fetch_and_verify, persist_trust, tree_digest
from edge_core.errors import DriverUnavailable, FetchError, RollbackError, UntrustedInputError
from edge_core.logs import log_context

__all__ = ["META_TREE", "apply_prepared", "run_sync"]

log = logging.getLogger(__name__)

META_TREE = "installed_tree_digest"
_COMMIT_RE = re.compile(r"[0-9a-f]{7,64}")


def _as_commit(value: str | None) -> str | None:
    """Return ``value`` when it is a full or abbreviated lower-case hex commit id, else None."""
    return value if value is not None and _COMMIT_RE.fullmatch(value) else None


def run_sync(rt: Runtime, target: selection.Target, *, now: datetime | None = None,
             cache: SyncCache | None = None, prefetched: Prefetched | None = None,
             origin: str | None = None) -> SyncResult:
    """Run one sync of ``target`` with the runtime ``rt`` (the caller holds the apply lock).

    Every failure of a step ends the sync with its outcome and one-line reason, recorded and queued
    for the fleet server; nothing is raised for a refused, failed or unreachable release.

    Raises:
        StateError: the state database cannot be used.
    """
    when = now if now is not None else rt.clock()
    result, quiet = _steps(rt, target, when, cache, prefetched)
    if origin is not None:
        result = replace(result, origin=origin)
    return record.finish(rt.state, rt.config, result, when, quiet=quiet)


def _steps(rt: Runtime, target: selection.Target, now: datetime, cache: SyncCache | None,
           prefetched: Prefetched | None) -> tuple[SyncResult, bool]:
    """The steps up to record; returns the result and whether it is too routine for an event."""
    want = target.revision
    recovered = recover(rt.state, rt.ctx)
    try:
        rt.source.clear_stale_locks()  # under the cache's fetch lock: a lock file here outlived its process
    except FetchError as exc:
        return SyncResult("fetch_failed", commit=_as_commit(want), reason=str(exc)), False
    if recovered is not None:
        record.record(rt.state, rt.config, "recovered", now=now, commit=None, release=None,
                      reason=recovered.reason, status=recovered.status)
    installed = rt.state.installed()
    seen: list[str] = []
    try:
        verified = fetch_and_verify(rt, want, now, seen, cache=cache, prefetched=prefetched)
    except FetchError as exc:
        return SyncResult("fetch_failed", commit=_as_commit(want), reason=str(exc)), False
    except UntrustedInputError as exc:
        return SyncResult("refused", commit=_as_commit(seen[0] if seen else want), reason=str(exc)), False
    version, commit = verified.release.version, verified.commit
    same = installed is not None and installed.commit == commit
    try:
        selection.check_monotonic(target, version, installed)
    except RollbackError as exc:
        return SyncResult("refused", version, commit, reason=str(exc)), False
    with log_context(commit=commit, release=version):
        persist_trust(rt.state, verified)
        rt.state.raise_floor(verified.release.rollback_floor)
        paused = record.pause_reason(rt.state)
        if paused:
            return SyncResult("paused", version, commit, reason=f"paused: {paused}"), same
        hold = repeats.held(rt.state, commit, target.source, now)
        if hold is not None:
            held = SyncResult(hold.outcome, version, commit, reason=hold.reason, step=hold.step, held=True,
                              health_failed=hold.health_failed)
            return held, True
        return _select_plan_apply(rt, verified, now, cache, same=same)


def _select_plan_apply(rt: Runtime, verified: Verified, now: datetime, cache: SyncCache | None, *,
                       same: bool) -> tuple[SyncResult, bool]:
    version, commit = verified.release.version, verified.commit
    try:
        if cache is not None and cache.verified is verified and cache.desired is not None:
            desired = cache.desired
        else:
            desired = desired_for(rt, verified.tree)
        prepared = prepare(rt, desired, version, commit)
    except (UntrustedInputError, DriverUnavailable) as exc:
        return SyncResult("refused", version, commit, reason=str(exc)), False
    if not prepared.plan.is_noop:
        record.queue_started(rt.state, rt.config, now=now, commit=commit, release=version,
                             changes=len(prepared.plan.all_changes))
    result = apply_prepared(rt, prepared, version=version, commit=commit)
    if result.outcome in ("applied", "noop"):
        rt.state.set_installed(version, commit, list(desired.bundles))
        if not same or rt.state.get_meta(META_TREE) is None:
            rt.state.set_meta(META_TREE, tree_digest(verified.tree))
        if cache is not None and cache.verified is not verified:
            cache.verified, cache.desired = replace(verified, trust_changed=False), desired
    return result, result.outcome == "noop" and same


def apply_prepared(rt: Runtime, prepared: Prepared, *, version: int, commit: str) -> SyncResult:
    """Apply a prepared plan in one transaction with the release's health checks."""
    ctx = prepared.ctx
    outcome = apply_plan(prepared.plan, prepared.desired, ctx, rt.state, txn_id=secrets.token_hex(16),
                         version=version, commit=commit, managed=prepared.managed,
                         run_checks=lambda: run_checks(prepared.desired.checks, rt.runner, rt.config.root,
                                                       ctx.command_env))
    health = outcome.status == "rolled_back" and (outcome.step == "health checks"
                                                   or any(not c.ok for c in outcome.checks))
    return SyncResult(outcome.status, version, commit, reason=outcome.reason, step=outcome.step,
                      changes=outcome.changes, health_failed=health)
