"""Apply a plan as one transaction: journal, back up, apply, check health, then commit or undo.

For every change, in plan order:

1. ``driver.snapshot`` captures what the change will touch (file blobs are fsync'd in the backup
   store before it returns). A missing parent directory that an earlier change of the same
   transaction captured as absent (it created it) is not captured again: undoing newest first,
   that earlier record removes it after every later change is undone, so a second record of it
   would only be undone and then removed;
2. the records go to the journal (``state.journal_add``, committed to SQLite) *before* anything
   on the device is touched;
3. ``driver.apply`` makes the change, and the journal entry is marked done.

When every change is made, the release's health checks run. All good: the managed-resource rows
are updated (a resource managed for the first time remembers the backup record taken before its
first change as its ``original``, or a capture of what was there when it needed no change) and
the transaction is marked ``committed``, in one SQLite commit: a crash can never leave the rows of
the new release beside a transaction that recovery will undo (a resource the release dropped
would then be forgotten while its file is put back). Any error (a driver's foreign exception arrives
as a one-line DriverError, see :mod:`edge_agent.drivers.base`) or failed check: every journaled entry is
undone newest first (a half-applied change is undone like a finished one — restoring a record is
idempotent), systemd is reloaded and restarted where unit files or watched files were put back,
and the transaction is marked ``rolled_back``.

Recovery rule — "undo, then converge": a transaction the agent did not finish (it was killed or
the device lost power) is found open by :func:`recover` at the next start; all its entries are
undone newest first and it is marked ``rolled_back``. The next sync then plans and applies the
release from scratch. Because every write is atomic and every backup is durable before the
journal entry that names it, each path is wholly old or wholly new at any instant, and wholly old
after recovery.

Journal format: each journal entry's ``backup`` is the list of the driver's backup records, each
tagged with an ``"engine"`` key ``{"driver": kind, "unit": systemd unit name or None, "action":
action}`` so that recovery knows which driver undoes which record without the plan. The tag is
removed before a record is handed to ``driver.undo``; ``fsafe_backup.referenced_blobs`` reads the
records as they are, so :func:`clean_backup_store` keeps every blob the journal still needs.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.drivers.base import Change, Context, get_driver
from edge_agent.engine.health import CheckResult
from edge_agent.engine.plan import Plan
from edge_agent.fsafe_backup import referenced_blobs
from edge_agent.fsafe_fd import is_temp_name
from edge_agent.state import Managed, StateDB
from edge_core.errors import EdgeFleetError, StateError
from edge_core.release import DesiredState
from edge_core.resources import Resource

__all__ = ["Outcome", "apply_plan", "clean_backup_store", "recover", "undo_entries"]

log = logging.getLogger(__name__)

_UNIT_KIND = "systemd_unit"
_TAG = "engine"
_KEEP_TRANSACTIONS = 20
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Outcome:
    """The result of one apply (or of a recovery).

    Attributes:
        status: ``applied`` | ``noop`` | ``rolled_back`` | ``failed`` | ``refused``.
        step: the summary of the failing change or the name of the failing health check.
        reason: a one-line reason for anything but ``applied``/``noop``.
        changes: how many changes were applied (or attempted, before a rollback).
        checks: the health check results, when the checks ran.
    """

    status: str
    step: str | None = None
    reason: str | None = None
    changes: int = 0
    checks: tuple[CheckResult, ...] = ()


@dataclass
class _Journaled:
    seq: int
    change: Change
    records: list[dict[str, Any]]


def _unit_of(change: Change) -> str | None:
    if change.kind != _UNIT_KIND:
        return None
    name = change.data.get("unit") or change.data.get("name")
    return str(name) if name else None


def _without_created_parents(change: Change, created: set[str]) -> Change:
    """``change`` for its snapshot: without the missing parents (every path but its own, the last)
    that an earlier change of the transaction captured as absent."""
    parents = change.paths[:-1]
    if not any(p in created for p in parents):
        return change
    return replace(change, paths=(*(p for p in parents if p not in created), change.paths[-1]))


def _absent_paths(records: list[dict[str, Any]]) -> Iterator[str]:
    """The paths of the capture records that found nothing there."""
    for record in records:
        path = record.get("path")
        if record.get("kind") == "absent" and "type" not in record and isinstance(path, str):
            yield path


def _tagged(change: Change, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tag = {"driver": change.kind, "unit": _unit_of(change), "action": change.action}
    return [{**record, _TAG: tag} for record in records]


def apply_plan(
    plan: Plan,
    desired: DesiredState,
    ctx: Context,
    state: StateDB,
    *,
    txn_id: str,
    version: int,
    commit: str,
    run_checks: Callable[[], list[CheckResult]],
    managed: Mapping[str, Managed] | None = None,
) -> Outcome:
    """Apply ``plan`` in one transaction and return how it ended (see the module docstring).

    A refused plan (drivers unavailable) returns ``refused`` and touches nothing. A plan with no
    change returns ``noop`` without running the health checks; it only records resources that
    are managed for the first time. A failure to undo returns ``failed`` (the journal keeps the
    entries; the reason names the first record that could not be put back).

    Args:
        plan: the plan made by :func:`edge_agent.engine.plan.make_plan` for ``desired``.
        desired: the desired state the plan was made from.
        ctx: the driver context.
        state: the device's state database.
        txn_id: a unique id for this transaction.
        version: the release version being applied.
        commit: the Git commit being applied.
        run_checks: runs the release's health checks after the changes.
        managed: the managed resources the plan was made with (None: read them from ``state``).

    Raises:
        StateError: the journal cannot be written (before anything is touched for that change).
    """
    if plan.unavailable:
        reason = "; ".join(f"{kind}: {why}" for kind, why in sorted(plan.unavailable.items()))
        return Outcome("refused", reason=f"drivers unavailable on this device: {reason}")
    if managed is None:
        managed = state.managed()
    if plan.is_noop:
        state.update_managed(*_managed_changes(desired, managed, ctx, first_records={}))
        return Outcome("noop")

    state.begin_txn(txn_id, version=version, commit=commit)
    log.info("transaction %s: applying %s changes of release %s (%s)", txn_id, len(plan.all_changes),
             version, commit)
    done: list[_Journaled] = []
    created: set[str] = set()  # paths this transaction captured as absent
    current: Change | None = None
    try:
        for seq, change in enumerate(plan.all_changes):
            current = change
            driver = get_driver(change.kind)
            records = driver.snapshot(_without_created_parents(change, created), ctx)
            created.update(_absent_paths(records))
            state.journal_add(txn_id, seq, change.resource_id, change.action, _tagged(change, records))
            done.append(_Journaled(seq, change, records))
            log.info("apply %s %s: %s", change.action, change.resource_id, change.summary)
            driver.apply(change, ctx)
            state.journal_done(txn_id, seq)
    except EdgeFleetError as exc:  # drivers turn foreign failures into DriverError (drivers.base)
        failing = current.summary if current is not None else "transaction"
        reason = str(exc)
        log.warning("transaction %s: %s failed: %s; rolling back", txn_id, failing, reason)
        return _roll_back(txn_id, done, ctx, state, step=failing, reason=reason)
    except BaseException:
        log.warning("transaction %s interrupted; rolling back", txn_id)
        _roll_back(txn_id, done, ctx, state, step="interrupted", reason="interrupted")
        raise

    try:
        results = tuple(run_checks())
    except Exception as exc:  # noqa: BLE001 - a crashing check runner fails the release like a check
        return _roll_back(txn_id, done, ctx, state, step="health checks",
                          reason=f"health checks crashed: {exc}")
    failed = [r for r in results if not r.ok]
    if failed:
        first = failed[0]
        step = f"{first.bundle}/{first.name}"
        log.warning("transaction %s: health check %s failed: %s; rolling back", txn_id, step, first.detail)
        outcome = _roll_back(txn_id, done, ctx, state, step=step,
                             reason=f"health check {step} failed: {first.detail}")
        return Outcome(outcome.status, outcome.step, outcome.reason, outcome.changes, results)

    first_records: dict[str, list[dict[str, Any]]] = {}
    for entry in done:
        if entry.records and entry.change.resource_id not in first_records:
            first_records[entry.change.resource_id] = entry.records
    try:
        put, forget = _managed_changes(desired, managed, ctx, first_records=first_records)
        state.finish_txn(txn_id, "committed", put=put, forget=forget)  # one commit: release and its rows
    except EdgeFleetError as exc:  # without its managed rows the release cannot stay applied
        return _roll_back(txn_id, done, ctx, state, step="record managed resources", reason=str(exc))
    log.info("transaction %s committed (%s changes)", txn_id, len(done))
    _housekeeping(state, ctx)
    return Outcome("applied", changes=len(done), checks=results)


def _managed_changes(
    desired: DesiredState, managed: Mapping[str, Managed], ctx: Context, *,
    first_records: Mapping[str, list[dict[str, Any]]],
) -> tuple[list[Managed], list[str]]:
    """Return the managed rows to record (every desired resource whose spec is new or changed)
    and the ids to forget (no longer desired).

    A resource managed for the first time keeps as ``original`` the record, among those taken
    before its first change, of its own path (not of parent directories the change created),
    else the first record; when it needed no change, a capture of its path as it is.
    """
    now = time.time()
    desired_ids = set()
    put: list[Managed] = []
    for res in desired.resources:
        desired_ids.add(res.id)
        spec, digest = _spec_of(desired, res, ctx)
        old = managed.get(res.id)
        if old is not None and old.kind == res.kind:
            if old.digest != digest:  # the digest is of the spec: equal digests, equal specs
                put.append(Managed(res.id, res.kind, spec, digest, old.original, old.first_managed_at))
            continue
        original = _original_of(res.paths, first_records.get(res.id, []))
        if original is None and len(res.paths) == 1 and res.kind != "absent":
            original = ctx.fs.capture(res.paths[0], ctx.backup_store)
        put.append(Managed(res.id, res.kind, spec, digest, original, now))
    return put, [rid for rid in managed if rid not in desired_ids]


def _spec_of(desired: DesiredState, res: Resource, ctx: Context) -> tuple[dict[str, Any], str]:
    known = desired.spec_memo.get(res.id)
    if known is None:
        known = desired.spec_memo[res.id] = get_driver(res.kind).spec_of(res, ctx)
    return known


def _original_of(paths: Sequence[str], records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    for record in records:
        if paths and record.get("path") == paths[-1] and "type" not in record:
            return record
    return records[0] if records else None


def _roll_back(
    txn_id: str, done: Sequence[_Journaled], ctx: Context, state: StateDB, *, step: str, reason: str,
) -> Outcome:
    entries = [(j.change.kind, _unit_of(j.change), j.change.action, j.records) for j in done]
    problems = undo_entries(entries, ctx)
    if problems:
        state.finish_txn(txn_id, "failed")
        return Outcome("failed", step, f"{reason}; undo failed: {problems[0]}", len(done))
    state.finish_txn(txn_id, "rolled_back")
    log.info("transaction %s rolled back (%s changes undone)", txn_id, len(done))
    _housekeeping(state, ctx)
    return Outcome("rolled_back", step, reason, len(done))


def undo_entries(
    entries: Sequence[tuple[str, str | None, str, Sequence[Mapping[str, Any]]]], ctx: Context,
) -> list[str]:
    """Undo journal entries ``(kind, unit, action, records)`` newest first; return the problems.

    Every record is attempted even when an earlier one fails. Afterwards, when a unit file was
    put back or a unit was restarted or started by the transaction, systemd is reloaded and those
    units are restarted (through the ``systemd_unit`` driver) so the old configuration runs again.
    """
    problems: list[str] = []
    reload_needed = False
    restart: list[str] = []
    for kind, unit, action, records in reversed(entries):
        for record in reversed(records):
            try:
                if kind:
                    get_driver(kind).undo(record, ctx)
                else:
                    ctx.fs.restore(dict(record), ctx.backup_store)
            except EdgeFleetError as exc:  # keep undoing the rest, report every failure
                where = record.get("path") or record.get("name") or kind
                problems.append(f"{where}: {exc}")
                log.error("undo of %s failed: %s", where, exc)
        if kind == _UNIT_KIND and unit:
            if any("path" in r and "type" not in r for r in records):
                reload_needed = True
                if unit not in restart:
                    restart.append(unit)
            elif action == "restart" and unit not in restart:
                restart.append(unit)
    if reload_needed or restart:
        problems += _refresh_units(restart, reload_needed, ctx)
    return problems


def _refresh_units(units: Sequence[str], reload_needed: bool, ctx: Context) -> list[str]:
    """Reload systemd and restart ``units`` that run, after their files were put back."""
    problems: list[str] = []
    driver = get_driver(_UNIT_KIND)
    todo: list[Change] = []
    if reload_needed:
        todo.append(Change("systemd", _UNIT_KIND, "daemon-reload", "reload systemd after undo"))
    todo += [Change(f"systemd_unit:{u}", _UNIT_KIND, "restart", f"restart {u} after undo",
                    data={"name": u, "unit": u, "reason": "undo", "if_running": True}) for u in units]
    for change in todo:
        try:
            driver.apply(change, ctx)
        except EdgeFleetError as exc:  # report, keep going
            problems.append(f"{change.summary}: {exc}")
            log.error("%s failed: %s", change.summary, exc)
    return problems


def recover(state: StateDB, ctx: Context) -> Outcome | None:
    """Undo a transaction a crash left open; return its outcome, or ``None`` when there was none.

    Leftover temp files of interrupted atomic writes are removed from the directories of the
    journaled paths. The transaction is marked ``rolled_back`` (``failed`` when a record could not
    be put back; the reason names it).

    Raises:
        StateError: the journal cannot be read or updated.
    """
    open_txn = state.open_txn()
    if open_txn is None:
        return None
    log.warning("recovering interrupted transaction %s (release %s, %s journal entries)",
                open_txn.txn_id, open_txn.version, len(open_txn.entries))
    entries: list[tuple[str, str | None, str, Sequence[Mapping[str, Any]]]] = []
    for entry in sorted(open_txn.entries, key=lambda e: e.seq):
        records = [r for r in entry.backup if isinstance(r, dict)]
        if not records:
            continue  # nothing was backed up, so nothing to undo (a command, a daemon-reload)
        tag = records[0].get(_TAG)
        if not isinstance(tag, dict) or not isinstance(tag.get("driver"), str):
            entries.append(("", None, entry.action, records))  # untagged: plain fsafe records
            continue
        unit = tag.get("unit")
        entries.append((tag["driver"], unit if isinstance(unit, str) else None, entry.action,
                        [{k: v for k, v in r.items() if k != _TAG} for r in records]))
    problems = undo_entries(entries, ctx)
    _clean_temp_files(entries, ctx)
    status = "failed" if problems else "rolled_back"
    state.finish_txn(open_txn.txn_id, status)
    if not problems:
        _housekeeping(state, ctx)
    reason = f"interrupted transaction {open_txn.txn_id} of release {open_txn.version} undone"
    if problems:
        reason += f"; undo failed: {problems[0]}"
    return Outcome(status, "recovery", reason, len(entries))


def _clean_temp_files(entries: Sequence[tuple[str, str | None, str, Sequence[Mapping[str, Any]]]],
                      ctx: Context) -> None:
    dirs: set[str] = set()
    for _kind, _unit, _action, records in entries:
        for record in records:
            path = record.get("path")
            if isinstance(path, str) and "type" not in record:
                parent = path.rpartition("/")[0]
                if parent:
                    dirs.add(parent)
    for d in sorted(dirs):
        try:
            if ctx.fs.lstat(d) is not None:
                ctx.fs.clean_temp_files(d)
        except EdgeFleetError as exc:
            log.warning("cannot clean temp files in %s: %s", d, exc)


def clean_backup_store(state: StateDB, store: Path) -> int:
    """Delete blobs of ``store`` that no journal entry or managed original refers to; return how many.

    Call it only while holding the apply lock (no transaction may be capturing at the same time).

    Raises:
        StateError: the state database cannot be read.
    """
    try:
        names = os.listdir(store)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("cannot list the backup store %s: %s", store, exc)
        return 0
    candidates = [name for name in names if _BLOB_NAME.fullmatch(name) or is_temp_name(name)]
    if not candidates:
        return 0  # nothing to delete: the records (one per managed resource) need not be read
    keep = referenced_blobs(state.backup_records())
    removed = 0
    for name in candidates:
        if name in keep:
            continue
        try:
            (store / name).unlink()
            removed += 1
        except OSError as exc:
            log.warning("cannot remove backup blob %s: %s", name, exc)
    if removed:
        log.info("removed %s unreferenced backup blobs", removed)
    return removed


def _housekeeping(state: StateDB, ctx: Context) -> None:
    """Forget old finished transactions and the blobs nobody needs any more (best effort)."""
    try:
        state.prune_journal(_KEEP_TRANSACTIONS)
        clean_backup_store(state, ctx.backup_store)
    except StateError as exc:
        log.warning("journal housekeeping failed: %s", exc)
