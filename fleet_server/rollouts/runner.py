"""The rollout runner: drives the pure state machine (:mod:`.engine`) with real events and carries out
its effects.

Where events come from: the runner **polls the store** once a tick, instead of a callback from the
ingest writer: ``events`` and ``health`` rows above a cursor, and the registry rows changed since
the last tick (``device_changes``, kept by triggers: a device inserted, or its online, release,
paused, labels or profile changed; see :mod:`fleet_server.store.sqlite.feed`). Polling is the simpler
robust choice: the store is already the durable queue the ingest path commits to, the cursor is
committed in the same transaction as the rollout states it produced (a crash replays the rows after
it, and the engine ignores what it has seen), and the ingest path knows nothing about rollouts. The
whole registry is read once after a load (or when no rollout was held), then only what changed.

Mapping of device reports to engine events: see :mod:`.runner_io`. Besides the history, a registry
row showing the release the device was assigned is ``applied`` (a no-op sync sends no event) and
one showing ``paused: true`` is ``deferred``; a device whose registry row or rollout status changed
is compared again at the next tick (so an assignment made in one tick is matched with the registry
in the next). Engine time is the server's clock when the row is read (strictly increasing, so a
report read after an assignment is stamped after it), never the device's.

Bounded ticks: a tick handles at most ``tick_budget`` registry changes and history rows; the rest
waits for the next tick, so a backlog never holds the lock (or the interpreter) for long and ingest
keeps up. API reads use the views published after each tick (:mod:`.runner_views`) and never wait
for one; operator actions take the lock between two ticks.

Effects: ``AssignRelease`` becomes a row of ``rollout_assignments`` (written unpublished in the same
transaction as the state, then published as the retained ``desired`` message and marked published
once the broker acknowledged it: a transactional outbox, :mod:`.outbox`, so an assignment is never
lost and never published differently after a restart); ``Audit`` rows go to the audit log (target
``rollout/<id>``); ``GateEvaluated`` to the gate history; wave counts are sampled into
``rollout_samples`` whenever they change.

State is persisted once per tick, as deltas: the rollout row (everything but the devices) and one
``rollout_devices`` row per device that changed since the last write, with every audit row of the
tick, in one transaction (see :mod:`fleet_server.store.sqlite.feed`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fleet_server.errors import PlanError, StoreError, UsageError
from fleet_server.store import FleetStore, RolloutWrite
from fleet_server.ticker import Ticker

from .engine import judge_action, new_rollout, step, wave_counts
from .membership import is_targeted
from .model import (
    Abort,
    AssignRelease,
    Audit,
    Effect,
    Event,
    GateEvaluated,
    OperatorEvent,
    Pause,
    Promote,
    ReleaseRef,
    Resume,
    Rollback,
    RolloutState,
    Start,
    Supersede,
    Tick,
    device_dict,
)
from .outbox import AssignmentOutbox, PublishDesired
from .plan import RolloutPlan, parse_plan, with_preflight
from .runner_feed import RunnerFeed
from .runner_io import device_info, plan_from_tree, progress_counts, report_from_event, report_from_health
from .runner_live import Live, Registry
from .runner_views import RolloutView, RunnerReads, state_from_row

__all__ = [
    "ACTIONS",
    "FINAL_PHASES",
    "PhaseListener",
    "PublishDesired",
    "RolloutRunner",
    "plan_from_tree",
    "progress_counts",
    "report_from_event",
    "report_from_health",
]

log = logging.getLogger(__name__)

PhaseListener = Callable[[RolloutState, str], None]
"""``listener(state, old_phase)``: called after the store holds a rollout's new phase."""

FINAL_PHASES = ("rolled_back", "succeeded", "aborted", "superseded")
"""Phases after which a rollout takes no operator action but ``rollback``."""
_SERVING = ("succeeded", "rolled_back")
ACTIONS = ("pause", "resume", "promote", "abort", "rollback")
"""Operator actions :meth:`RolloutRunner.act` takes."""
_READ_CHUNK = 5000
TICK_BUDGET = 20000
"""Registry changes plus history rows one tick handles at most (the rest waits for the next tick)."""

class RolloutRunner(RunnerFeed, RunnerReads):
    """Runs every active rollout of one fleet server (see the module docstring). Thread-safe.

    Args:
        store: the fleet database.
        publish_desired: publishes one retained ``desired`` message (``Ingestor.publish_desired``).
        clock: returns POSIX time; every engine event carries it.
        tick_interval: seconds between ticks of the background thread.
        plan_loader: returns the plan named ``rollouts/<name>.yaml`` for ``plan_name`` starts
            (raises UsageError when unknown); None: named plans are not available.
        default_plan: the plan used when a start names none (fleet.yaml ``rollout:``), or None.
        tick_budget: registry changes plus history rows one tick handles at most.
    """

    def __init__(self, store: FleetStore, publish_desired: PublishDesired, *,
                 clock: Callable[[], float] = time.time, tick_interval: float = 1.0,
                 plan_loader: Callable[[str], RolloutPlan] | None = None,
                 default_plan: RolloutPlan | None = None, tick_budget: int = TICK_BUDGET) -> None:
        self._store = store
        self._outbox = AssignmentOutbox(store, publish_desired, clock)
        self._clock = clock
        self._ticker = Ticker("rollout-runner", self.tick, tick_interval, expected=(StoreError,), log=log,
                              join_timeout=30.0)
        self._plan_loader = plan_loader
        self.default_plan = default_plan
        self._budget = max(1, int(tick_budget))
        self._lock = threading.RLock()
        self._live: dict[str, Live] = {}
        self._views: Mapping[str, RolloutView] = {}
        self._cursor: dict[str, int] = {"events": 0, "health": 0}
        self._registry: dict[str, Registry] | None = None
        self._registry_seq = 0
        self._recheck: set[str] = set()
        self._loaded = False
        self._last_now = 0.0
        self._phase_listener: PhaseListener | None = None
        self._commit_listener: Callable[[RolloutWrite], None] | None = None
        self._phase_changes: list[tuple[RolloutState, str]] = []

    def _now(self) -> float:
        """The clock, made strictly increasing: a report read in a later call is always stamped after
        any assignment made in an earlier one (the engine counts only reports stamped after them)."""
        now = max(self._clock(), self._last_now + 1e-6)
        self._last_now = now
        return now

    # --- lifecycle ---------------------------------------------------------------------------------

    def load(self) -> int:
        """Reload every rollout that is not final (plus the newest succeeded or rolled-back one, which
        keeps serving late devices unless a newer rollout superseded it), republish assignments not yet
        published, and set the read cursor (the stored one, else the current end of history). Return
        how many rollouts were loaded.

        Raises:
            StoreError: the database cannot be read or written.
        """
        with self._lock:
            self._live.clear()
            serving_taken = False
            for summary in self._store.rollout_rows(limit=1000, with_state=False):
                phase = summary["phase"]
                if phase in FINAL_PHASES:
                    if phase not in _SERVING or serving_taken:
                        continue
                    serving_taken = True
                row = self._store.rollout_row(summary["id"])
                if row is None:
                    continue
                try:
                    state = state_from_row(row)
                except (PlanError, KeyError, TypeError, ValueError) as exc:
                    log.error("rollout %s cannot be reloaded (left as it is): %s", row["id"], exc)
                    continue
                if state.superseded_by:  # finished, then superseded: serves no device any more
                    continue
                self._live[state.rollout_id] = Live(state, row.get("actor") or "", row.get("reason") or "",
                                                    float(row["created"]), wave_counts(state), dirty=False,
                                                    updated=float(row["updated"]))
            cursor = self._store.rollout_cursor()
            self._cursor = cursor if cursor is not None else self._store.history_heads()
            self._cursor.setdefault("events", 0)
            self._cursor.setdefault("health", 0)
            self._registry = None
            self._recheck.clear()
            self._loaded = True
            self._publish_views()
            self._outbox.flush()
            log.info("rollout runner: %s rollout(s) loaded", len(self._live))
            return len(self._live)

    def start_thread(self) -> None:
        """Load (if not done) and tick every ``tick_interval`` seconds in a background thread.

        Raises:
            StoreError: the database cannot be read.
        """
        if not self._loaded:
            self.load()
        self._ticker.start()

    def stop(self) -> None:
        """Stop the background thread (bounded wait). Idempotent."""
        self._ticker.stop()

    def unload(self) -> None:
        """Stop (see :meth:`stop`) and forget every rollout held in memory: reads come from the store
        again, and the next start reloads (a replica that stopped leading)."""
        self.stop()
        with self._lock:
            self._live.clear()
            self._loaded = False
            self._publish_views()

    def set_phase_listener(self, listener: PhaseListener | None) -> None:
        """Call ``listener(state, old_phase)`` after every committed phase change (the fleet baseline
        follows rollouts this way); it runs in the runner's thread and must not raise."""
        self._phase_listener = listener

    def set_commit_listener(self, listener: Callable[[RolloutWrite], None] | None) -> None:
        """Call ``listener(write)`` after every committed write (notifications read its gate decisions);
        it runs in the runner's thread and must not raise."""
        self._commit_listener = listener

    def set_plan_loader(self, loader: Callable[[str], RolloutPlan] | None) -> None:
        """Set where ``plan_name`` starts find their plan (None: named plans are not available)."""
        self._plan_loader = loader

    # --- starting ----------------------------------------------------------------------------------

    def resolve_plan(self, plan: Mapping[str, Any] | None, plan_name: str | None) -> RolloutPlan:
        """Return the plan of a start request: an inline mapping, a named plan, or the default plan.

        Raises:
            UsageError: both or neither are given and there is no default, or the plan is unknown.
            PlanError: the inline plan is invalid (``where`` locates it).
        """
        if plan is not None and plan_name is not None:
            raise UsageError("give either an inline plan or a plan name, not both")
        if plan is not None:
            return parse_plan(dict(plan), source="")
        if plan_name is not None:
            if self._plan_loader is None:
                raise UsageError("named plans are not available on this server; send the plan inline")
            return self._plan_loader(plan_name)
        if self.default_plan is None:
            raise UsageError("no plan given and the fleet has no default rollout plan")
        return self.default_plan

    def start_refusal(self, release: int) -> str | None:
        """Return why a rollout of ``release`` cannot start now (a newer or the same release is being
        rolled out), or None."""
        with self._lock:
            for live in self._live.values():
                s = live.state
                if s.phase in FINAL_PHASES:
                    continue
                if s.release.version >= release:
                    return (f"rollout {s.rollout_id} of release {s.release.version} is {s.phase}; "
                            f"release {release} is not newer")
        return None

    def start(self, release: int, plan: RolloutPlan, *, actor: str, reason: str,
              rollout_id: str | None = None, preflight: bool = False) -> str:
        """Start a rollout of the recorded signed ``release`` with ``plan``; return its id. With
        ``preflight`` (or a plan that asks for one) its first wave waits for the preflight
        (:mod:`.preflight`, docs/rollouts.md).

        Targets the registered devices the plan's ``target`` selects. The previous release (what a
        rollback goes back to) is the release most targeted devices run below ``release``, else the
        release of the newest succeeded rollout, else none. Supersede policy: every rollout still in
        progress receives ``Supersede`` and stops assigning; the new one moves every device.

        Raises:
            UsageError: the release is unknown, or not newer than a rollout in progress.
            StoreError: the database cannot be read or written.
        """
        with self._lock:
            if not self._loaded:
                self.load()
            commit = self._store.release_commit(release)
            if commit is None:
                raise UsageError(f"release {release} is not a recorded signed release")
            refusal = self.start_refusal(release)
            if refusal is not None:
                raise UsageError(refusal)
            if preflight or plan.preflight is not None:
                plan = with_preflight(plan)
            now = self._now()
            rid = rollout_id or f"r{int(now)}-{release}-{uuid.uuid4().hex[:6]}"
            snapshot = self._store.device_snapshot()
            devices = [device_info(d) for d in snapshot]
            targeted = [d for d in devices if is_targeted(plan, d)]
            previous = self._previous(release, [d for d in snapshot if is_targeted(plan, device_info(d))])
            state = new_rollout(rid, plan, release=ReleaseRef(release, commit), previous=previous,
                                devices=targeted, now=now)
            write = RolloutWrite()
            for other in list(self._live.values()):
                if other.state.phase not in FINAL_PHASES or other.state.phase in _SERVING:
                    self._step(other, Supersede(new_rollout_id=rid, now=now), write)
            for other_id in [k for k, v in self._live.items() if v.state.phase in FINAL_PHASES]:
                self._persist_one(self._live[other_id], write, now)
                del self._live[other_id]
            live = Live(state, actor, reason, now, wave_counts(state), all_devices=True)
            self._live[rid] = live
            self._step(live, Start(now=now, actor=actor, reason=reason), write)
            self._commit(write, now)
            log.info("rollout %s of release %s started by %s: %s devices, previous %s", rid, release, actor,
                     len(targeted), previous.version if previous else None)
            return rid

    def on_new_release(self, release: int, plan: RolloutPlan | None) -> str | None:
        """Start a rollout of a newly recorded release with ``plan`` (the release's default plan; no
        rollout when None); return its id, or None when none started (logged).

        Raises:
            StoreError: the database cannot be read or written.
        """
        if plan is None:
            log.info("release %s: fleet.yaml declares no rollout plan; no rollout started", release)
            return None
        try:
            return self.start(release, plan, actor="git-watcher", reason=f"new signed release {release}")
        except UsageError as exc:
            log.warning("release %s: no rollout started: %s", release, exc)
            return None

    def _previous(self, release: int, targeted: Sequence[Mapping[str, Any]]) -> ReleaseRef | None:
        runs = Counter((d["release"], d.get("revision")) for d in targeted
                       if isinstance(d.get("release"), int) and d["release"] < release)
        if runs:
            (version, revision), _ = max(runs.items(), key=lambda kv: (kv[1], kv[0][0]))
            commit = self._store.release_commit(version) or revision
            if isinstance(commit, str) and commit:
                return ReleaseRef(version, commit)
        for row in self._store.rollout_rows(phases=("succeeded",), limit=20, with_state=False):
            if int(row["release"]) < release:
                return ReleaseRef(int(row["release"]), str(row["commit"]))
        return None

    # --- operator actions --------------------------------------------------------------------------

    def exists(self, rollout_id: str) -> bool:
        """Tell whether a rollout with this id was ever started.

        Raises:
            StoreError: the database cannot be read.
        """
        return rollout_id in self._views or self._store.rollout_exists(rollout_id)

    def act(self, rollout_id: str, action: str, *, actor: str, reason: str,
            wave: int | None = None) -> str | None:
        """Apply an operator ``action`` (one of :data:`ACTIONS`); return why it was refused, or None.

        A final rollout (not held in memory) is reloaded for ``rollback``. The action waits at most
        for the tick in progress (ticks are bounded), never for a backlog.

        Raises:
            UsageError: the action or the rollout is unknown.
            StoreError: the database cannot be read or written.
        """
        if action not in ACTIONS:
            raise UsageError(f"unknown rollout action {action!r}")
        with self._lock:
            live = self._live.get(rollout_id)
            if live is None:
                row = self._store.rollout_row(rollout_id)
                if row is None:
                    raise UsageError(f"no rollout {rollout_id}")
                live = Live(state_from_row(row), row.get("actor") or "", row.get("reason") or "",
                            float(row["created"]), [], dirty=False, updated=float(row["updated"]))
            now = self._now()
            event: OperatorEvent
            if action == "pause":
                event = Pause(actor=actor, reason=reason, now=now)
            elif action == "resume":
                event = Resume(actor=actor, reason=reason, now=now)
            elif action == "promote":
                event = Promote(actor=actor, reason=reason, now=now, wave=wave)
            elif action == "abort":
                event = Abort(actor=actor, reason=reason, now=now)
            else:
                event = Rollback(actor=actor, reason=reason, now=now)
            refusal, state, effects = judge_action(live.state, event)
            if refusal is not None:
                return refusal
            self._live[rollout_id] = live
            write = RolloutWrite()
            self._apply(live, state, effects, write)
            self._commit(write, now)
            return None

    # --- ticking -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Read what devices reported since the last tick (at most ``tick_budget`` registry changes
        and history rows; the rest next tick), step every live rollout with it and a ``Tick``, persist,
        publish, and publish the views API reads use.

        Raises:
            StoreError: the database cannot be read or written (nothing of the tick is kept; the next
                tick reads the same rows again).
        """
        with self._lock:
            if not self._loaded:
                self.load()
            now = self._now()
            write = RolloutWrite()
            cursor = dict(self._cursor)
            registry, registry_seq, recheck = self._registry, self._registry_seq, self._recheck
            try:
                if self._live:
                    self._recheck = set()
                    used = self._feed_registry(now, write, recheck)
                    self._feed_history(cursor, now, write, max(0, self._budget - used))
                    for live in list(self._live.values()):
                        self._step(live, Tick(now=now), write)
                else:
                    cursor = self._store.history_heads()
                    self._registry = None
                write.cursor = cursor
                self._commit(write, now)
            except BaseException:  # the next tick reads the same rows and compares the same devices again
                self._registry, self._registry_seq = registry, registry_seq
                self._recheck |= recheck
                raise
            self._cursor = cursor

    def _feed_history(self, cursor: dict[str, int], now: float, write: RolloutWrite, budget: int) -> None:
        for kind, read, convert in (("events", self._store.events_after, report_from_event),
                                    ("health", self._store.health_after, report_from_health)):
            while budget > 0:
                rows = read(cursor[kind], min(_READ_CHUNK, budget))
                for row in rows:
                    report = convert(row, now)
                    if report is not None:
                        self._report(report, write)
                if rows:
                    cursor[kind] = int(rows[-1]["id"])
                budget -= len(rows)
                if len(rows) < _READ_CHUNK:
                    break

    def _feed_registry(self, now: float, write: RolloutWrite, recheck: set[str]) -> int:
        """Compare the registry rows changed since the last tick (all of them the first time; at most
        ``tick_budget`` after that), and the devices whose rollout status changed in the last tick
        (with their cached row), with the rollouts; return how many rows were read."""
        if self._registry is None:
            self._registry_seq = self._store.registry_change_head()
            rows = self._store.device_snapshot()
            self._registry = {}
            for row in rows:
                self._registry_row(row, now, write, first=True)
            return len(rows)
        rows = self._store.registry_changes(self._registry_seq, self._budget)
        recheck = set(recheck)
        for row in rows:
            recheck.discard(str(row["id"]))
            self._registry_row(row, now, write, first=False)
        if rows:
            self._registry_seq = int(rows[-1]["seq"])
        known = self._registry
        for device_id in recheck:
            cached = known.get(device_id)
            if cached is not None:
                self._compare(device_id, cached, now, write)
        return len(rows)  # a compare with the cached row reads nothing: not counted

    # --- stepping and persisting ---------------------------------------------------------------------

    def _step(self, live: Live, event: Event, write: RolloutWrite) -> None:
        state, effects = step(live.state, event)
        self._apply(live, state, effects, write)

    def _apply(self, live: Live, state: RolloutState, effects: Sequence[Effect], write: RolloutWrite) -> None:
        old, live.state = live.state, state
        if state.phase != old.phase:
            self._phase_changes.append((state, old.phase))
        if state.changed:
            live.dirty_devices |= state.changed
            self._recheck |= state.changed
            live.dirty = True
        elif effects or state.phase != old.phase or state.waves != old.waves:
            live.dirty = True
        self._effects(state.rollout_id, effects, write)

    @staticmethod
    def _effects(rollout_id: str, effects: Sequence[Effect], write: RolloutWrite) -> None:
        for effect in effects:
            if isinstance(effect, AssignRelease):
                write.assignments.append({"device": effect.device, "rollout_id": effect.rollout_id,
                                          "release": effect.version, "commit": effect.commit,
                                          "assigned_at": None})
            elif isinstance(effect, Audit):
                write.audit.append({"at": effect.at, "actor": effect.actor,
                                    "action": f"rollout.{effect.action}", "target": f"rollout/{rollout_id}",
                                    "reason": effect.reason,
                                    "detail": dict(effect.detail)})
            elif isinstance(effect, GateEvaluated):
                write.gates.append({"rollout_id": rollout_id, "wave": effect.wave, "at": None,
                                    "passed": effect.passed, "detail": dict(effect.detail)})

    def _persist_one(self, live: Live, write: RolloutWrite, now: float) -> None:
        s = live.state
        data = s.to_dict(devices=False)
        write.rollouts.append({"id": s.rollout_id, "release": s.release.version, "commit": s.release.commit,
                               "previous": s.previous.version if s.previous else None,
                               "plan": data["plan"], "state": data, "phase": s.phase, "wave": s.wave,
                               "actor": live.actor, "reason": live.reason, "created": live.created,
                               "updated": now})
        changed = s.devices if live.all_devices else live.dirty_devices
        for device in changed:
            status = s.devices[device]
            write.devices.append({"rollout_id": s.rollout_id, "device": device, "wave": status.wave,
                                  "state": status.state, "data": device_dict(status)})
        counts = wave_counts(s)
        if counts != live.last_counts:
            for k, c in enumerate(counts):
                write.samples.append({"rollout_id": s.rollout_id, "wave": k, "ts": now, **progress_counts(c)})
            live.last_counts = counts
        live.dirty, live.all_devices, live.dirty_devices, live.updated = False, False, set(), now

    def _commit(self, write: RolloutWrite, now: float) -> None:
        dirty = [live for live in self._live.values() if live.dirty]
        for live in dirty:
            self._persist_one(live, write, now)
        for a in write.assignments:
            a["assigned_at"] = now
        for g in write.gates:
            g["at"] = now
        latest: dict[str, dict[str, Any]] = {}
        for a in write.assignments:
            latest[a["device"]] = a
        write.assignments = list(latest.values())
        if write.rollouts or write.audit or write.assignments or write.samples or write.gates \
                or write.cursor is not None:
            try:
                self._store.write_rollouts(write)
            except StoreError:
                for live in dirty:  # not written: written again, whole, by the next commit
                    live.dirty = live.all_devices = True
                raise
            if self._commit_listener is not None and write.gates:
                try:
                    self._commit_listener(write)
                except Exception:  # a listener bug must not end the tick; logged with its traceback
                    log.exception("rollout runner: commit listener failed")
        for rid in [k for k, v in self._live.items()
                    if v.state.phase in ("aborted", "superseded")]:
            del self._live[rid]
        self._publish_views()
        if write.assignments:
            self._outbox.flush()
        else:
            self._outbox.settle()
        self._notify_phase_changes()

    def _notify_phase_changes(self) -> None:
        changes, self._phase_changes = self._phase_changes, []
        if self._phase_listener is None:
            return
        for state, old_phase in changes:
            try:
                self._phase_listener(state, old_phase)
            except Exception:  # a listener bug must not end the tick; logged with its traceback
                log.exception("rollout runner: phase listener failed for %s", state.rollout_id)

    def _publish_views(self) -> None:
        """Replace the views reads use with the rollouts as they stand now."""
        self._views = {rid: RolloutView(live.state, tuple(wave_counts(live.state)), live.actor, live.reason,
                                        live.created, live.updated) for rid, live in self._live.items()}
