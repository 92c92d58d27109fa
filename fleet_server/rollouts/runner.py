"""The rollout runner: drives the pure state machine (:mod:`.engine`) with real events and carries out
its effects.

Where events come from: the runner **polls the store** (``events`` and ``health`` rows above a cursor,
and a snapshot of the device registry for online, paused, joined devices) once a tick, instead of a
callback from the ingest writer. Polling is the simpler robust choice: the store is already the
durable queue the ingest path commits to, the cursor is committed in the same transaction as the
rollout states it produced (a crash replays the rows after it, and the engine ignores what it has
seen), and the ingest path knows nothing about rollouts. One tick costs two indexed range reads and
one scan of the device registry (about 10 ms for 10,000 devices).

Mapping of device reports to engine events (see ``docs/rollouts.md``): ``sync_succeeded`` ->
``applied``, ``sync_failed`` -> ``failed``, ``sync_refused`` -> ``refused``, ``sync_rolled_back``
-> ``rolled_back``, a ``paused`` event or a status with ``paused: true`` -> ``deferred``; a status
showing the release the device was assigned -> ``applied`` (a no-op sync sends no event); a health
sample with a failing check -> ``health_failed``, a passing one -> ``applied`` carrying the metrics
for the telemetry gates. Engine time is the server's clock when the row is read (strictly
increasing, so a report read after an assignment is stamped after it), never the device's.

Effects: ``AssignRelease`` becomes a row of ``rollout_assignments`` (written unpublished in the same
transaction as the state, then published as the retained ``desired`` message and marked published:
a transactional outbox, so an assignment is never lost and never published differently after a
restart); ``Audit`` rows go to the audit log (target ``rollout/<id>``); ``GateEvaluated`` to the gate
history; wave counts are sampled into ``rollout_samples`` whenever they change.

State is persisted once per tick (every step of the tick, with all their audit rows, in one
transaction): serialising a 10,000-device state takes about 60 ms, too much for every report.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import BrokerError, BundleError, MessageError, StateError
from edge_agent.yamlsafe import load_yaml
from fleet_server.errors import UsageError
from fleet_server.store import RolloutWrite, Store

from .engine import (
    Abort,
    AssignRelease,
    Audit,
    DeviceJoined,
    DeviceOnline,
    DeviceReport,
    Effect,
    Event,
    GateEvaluated,
    Pause,
    Promote,
    ReleaseRef,
    Resume,
    Rollback,
    RolloutState,
    Start,
    Supersede,
    Tick,
    check_action,
    new_rollout,
    step,
    wave_counts,
)
from .membership import DeviceInfo, is_targeted
from .plan import RolloutPlan, parse_fleet_rollout, parse_plan

__all__ = [
    "ACTIONS",
    "FINAL_PHASES",
    "PublishDesired",
    "RolloutRunner",
    "plan_from_tree",
    "progress_counts",
    "report_from_event",
    "report_from_health",
]

log = logging.getLogger(__name__)

PublishDesired = Callable[[str, str, int, str | None], None]
"""``publish_desired(device_id, revision, release, rollout_id)``: publish one retained assignment."""

FINAL_PHASES = ("rolled_back", "succeeded", "aborted", "superseded")
"""Phases after which a rollout takes no operator action but ``rollback``."""
_SERVING = ("succeeded", "rolled_back")
ACTIONS = ("pause", "resume", "promote", "abort", "rollback")
"""Operator actions :meth:`RolloutRunner.act` takes."""
_EVENT_OUTCOMES = {"sync_succeeded": "applied", "sync_failed": "failed", "sync_refused": "refused",
                   "sync_rolled_back": "rolled_back", "paused": "deferred"}
_READ_CHUNK = 5000
_PROGRESS_KEYS = ("done", "failed", "pending", "offline", "deferred", "skipped")


def report_from_event(row: Mapping[str, Any], now: float) -> DeviceReport | None:
    """Turn one stored ``events`` row into the engine's :class:`DeviceReport` (None when it says nothing
    about a rollout). A ``paused`` event is ``deferred`` with no release (the lock holds whatever comes)."""
    outcome = _EVENT_OUTCOMES.get(str(row.get("type")))
    if outcome is None:
        return None
    release = row.get("release")
    version = release if isinstance(release, int) and outcome != "deferred" else None
    return DeviceReport(device=str(row["device"]), now=now, outcome=outcome, release_version=version)


def report_from_health(row: Mapping[str, Any], now: float) -> DeviceReport | None:
    """Turn one stored ``health`` sample into a :class:`DeviceReport`: ``health_failed`` when a check
    failed, else ``applied`` with the sample (metrics and checks) for the telemetry gates. None when
    the device's release is unknown."""
    release = row.get("release")
    if not isinstance(release, int):
        return None
    raw_checks = row.get("checks")
    checks: list[Any] = raw_checks if isinstance(raw_checks, list) else []
    failing = any(isinstance(c, Mapping) and c.get("ok") is False for c in checks)
    health = {"metrics": row.get("metrics") or {}, "checks": checks}
    return DeviceReport(device=str(row["device"]), now=now, outcome="health_failed" if failing else "applied",
                        release_version=release, health=health)


def plan_from_tree(tree: Mapping[str, bytes], name: str | None = None) -> RolloutPlan | None:
    """Return a plan from a verified release tree: ``rollouts/<name>.yaml`` when ``name`` is given, else
    the default plan fleet.yaml's ``rollout:`` declares (inline, or ``{plan: NAME}``); None when
    fleet.yaml declares none.

    Raises:
        UsageError: the named plan is not in the tree.
        BundleError: fleet.yaml or the plan is invalid (YamlError for malformed YAML).
    """
    if name is None:
        fleet = tree.get("fleet.yaml")
        if fleet is None:
            return None
        doc = load_yaml(fleet, name="fleet.yaml").value
        declared = parse_fleet_rollout(doc.get("rollout") if isinstance(doc, Mapping) else None)
        if declared is None or isinstance(declared, RolloutPlan):
            return declared
        name = declared.name
    for suffix in (".yaml", ".yml"):
        path = f"rollouts/{name}{suffix}"
        if path in tree:
            return parse_plan(load_yaml(tree[path], name=path).value, source=path)
    raise UsageError(f"no rollout plan rollouts/{name}.yaml in the release")


def progress_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Group one wave's device states for the progress bars and charts: ``done`` (applied),
    ``failed`` (failed, refused, rolled back), ``pending`` (pending, assigned), ``offline``,
    ``deferred``, ``skipped``."""
    return {"done": counts.get("applied", 0),
            "failed": counts.get("failed", 0) + counts.get("refused", 0) + counts.get("rolled_back", 0),
            "pending": counts.get("pending", 0) + counts.get("assigned", 0),
            "offline": counts.get("offline", 0), "deferred": counts.get("deferred", 0),
            "skipped": counts.get("skipped", 0)}


@dataclass
class _Live:
    """One rollout the runner drives, with what it last persisted."""

    state: RolloutState
    actor: str
    reason: str
    created: float
    last_counts: list[dict[str, int]]
    dirty: bool = True


class RolloutRunner:
    """Runs every active rollout of one fleet server (see the module docstring). Thread-safe.

    Args:
        store: the fleet database.
        publish_desired: publishes one retained ``desired`` message (``Ingestor.publish_desired``).
        clock: returns POSIX time; every engine event carries it.
        tick_interval: seconds between ticks of the background thread.
        plan_loader: returns the plan named ``rollouts/<name>.yaml`` for ``plan_name`` starts
            (raises UsageError when unknown); None: named plans are not available.
        default_plan: the plan used when a start names none (fleet.yaml ``rollout:``), or None.
    """

    def __init__(self, store: Store, publish_desired: PublishDesired, *,
                 clock: Callable[[], float] = time.time, tick_interval: float = 1.0,
                 plan_loader: Callable[[str], RolloutPlan] | None = None,
                 default_plan: RolloutPlan | None = None) -> None:
        self._store = store
        self._publish = publish_desired
        self._clock = clock
        self._interval = tick_interval
        self._plan_loader = plan_loader
        self.default_plan = default_plan
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._cursor: dict[str, int] = {"events": 0, "health": 0}
        self._known: dict[str, dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded = False
        self._last_now = 0.0

    def _now(self) -> float:
        """The clock, made strictly increasing: a report read in a later call is always stamped after
        any assignment made in an earlier one (the engine counts only reports stamped after them)."""
        now = max(self._clock(), self._last_now + 1e-6)
        self._last_now = now
        return now

    # --- lifecycle ---------------------------------------------------------------------------------

    def load(self) -> int:
        """Reload every rollout that is not final (plus the newest succeeded or rolled-back one, which
        keeps serving late devices), republish assignments not yet published, and set the read cursor
        (the stored one, else the current end of history). Return how many rollouts were loaded.

        Raises:
            StateError: the database cannot be read or written.
        """
        with self._lock:
            self._live.clear()
            rows = self._store.rollout_rows(limit=1000)
            serving_taken = False
            for row in rows:
                phase = row["phase"]
                if phase in FINAL_PHASES:
                    if phase not in _SERVING or serving_taken:
                        continue
                    serving_taken = True
                try:
                    state = RolloutState.from_dict(row["state"])
                except (BundleError, KeyError, TypeError, ValueError) as exc:
                    log.error("rollout %s cannot be reloaded (left as it is): %s", row["id"], exc)
                    continue
                self._live[state.rollout_id] = _Live(state, row.get("actor") or "", row.get("reason") or "",
                                                     float(row["created"]), wave_counts(state), dirty=False)
            cursor = self._store.rollout_cursor()
            self._cursor = cursor if cursor is not None else self._store.history_heads()
            self._cursor.setdefault("events", 0)
            self._cursor.setdefault("health", 0)
            self._known = None
            self._loaded = True
            self._publish_pending()
            log.info("rollout runner: %s rollout(s) loaded", len(self._live))
            return len(self._live)

    def start_thread(self) -> None:
        """Load (if not done) and tick every ``tick_interval`` seconds in a background thread.

        Raises:
            StateError: the database cannot be read.
        """
        if not self._loaded:
            self.load()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-runner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.tick()
            except StateError as exc:
                log.error("rollout runner: tick failed (retried next tick): %s", exc)
            except Exception:  # a bug must not end the runner; logged with its traceback
                log.exception("rollout runner: tick failed unexpectedly")

    def stop(self) -> None:
        """Stop the background thread (bounded wait). Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30.0)

    def set_plan_loader(self, loader: Callable[[str], RolloutPlan] | None) -> None:
        """Set where ``plan_name`` starts find their plan (None: named plans are not available)."""
        self._plan_loader = loader

    # --- starting ----------------------------------------------------------------------------------

    def resolve_plan(self, plan: Mapping[str, Any] | None, plan_name: str | None) -> RolloutPlan:
        """Return the plan of a start request: an inline mapping, a named plan, or the default plan.

        Raises:
            UsageError: both or neither are given and there is no default, or the plan is unknown.
            BundleError: the inline plan is invalid (``where`` locates it).
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
              rollout_id: str | None = None) -> str:
        """Start a rollout of the recorded signed ``release`` with ``plan``; return its id.

        Targets the registered devices the plan's ``target`` selects. The previous release (what a
        rollback goes back to) is the release most targeted devices run below ``release``, else the
        release of the newest succeeded rollout, else none. Supersede policy: every rollout still in
        progress receives ``Supersede`` and stops assigning; the new one moves every device.

        Raises:
            UsageError: the release is unknown, or not newer than a rollout in progress.
            StateError: the database cannot be read or written.
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
            now = self._now()
            rid = rollout_id or f"r{int(now)}-{release}-{uuid.uuid4().hex[:6]}"
            snapshot = self._store.device_snapshot()
            devices = [_info(d) for d in snapshot]
            targeted = [d for d in devices if is_targeted(plan, d)]
            previous = self._previous(release, [d for d in snapshot if is_targeted(plan, _info(d))])
            state = new_rollout(rid, plan, release=ReleaseRef(release, commit), previous=previous,
                                devices=targeted, now=now)
            write = RolloutWrite()
            for other in list(self._live.values()):
                if other.state.phase not in FINAL_PHASES or other.state.phase in _SERVING:
                    self._step(other, Supersede(new_rollout_id=rid, now=now), write)
            for other_id in [k for k, v in self._live.items() if v.state.phase in FINAL_PHASES]:
                self._persist_one(self._live[other_id], write, now)
                del self._live[other_id]
            live = _Live(state, actor, reason, now, wave_counts(state))
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
            StateError: the database cannot be read or written.
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
        for row in self._store.rollout_rows(phases=("succeeded",), limit=20):
            if int(row["release"]) < release:
                return ReleaseRef(int(row["release"]), str(row["commit"]))
        return None

    # --- operator actions --------------------------------------------------------------------------

    def exists(self, rollout_id: str) -> bool:
        """Tell whether a rollout with this id was ever started.

        Raises:
            StateError: the database cannot be read.
        """
        with self._lock:
            return rollout_id in self._live or self._store.rollout_row(rollout_id) is not None

    def act(self, rollout_id: str, action: str, *, actor: str, reason: str,
            wave: int | None = None) -> str | None:
        """Apply an operator ``action`` (one of :data:`ACTIONS`); return why it was refused, or None.

        A final rollout (not held in memory) is reloaded for ``rollback``.

        Raises:
            UsageError: the action or the rollout is unknown.
            StateError: the database cannot be read or written.
        """
        if action not in ACTIONS:
            raise UsageError(f"unknown rollout action {action!r}")
        with self._lock:
            live = self._live.get(rollout_id)
            if live is None:
                row = self._store.rollout_row(rollout_id)
                if row is None:
                    raise UsageError(f"no rollout {rollout_id}")
                live = _Live(RolloutState.from_dict(row["state"]), row.get("actor") or "",
                             row.get("reason") or "", float(row["created"]), [], dirty=False)
            now = self._now()
            event: Event
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
            refusal = check_action(live.state, event)
            if refusal is not None:
                return refusal
            self._live[rollout_id] = live
            write = RolloutWrite()
            self._step(live, event, write)
            self._commit(write, now)
            return None

    # --- ticking -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Read what devices reported since the last tick, step every live rollout with it and a
        ``Tick``, persist and publish.

        Raises:
            StateError: the database cannot be read or written (nothing of the tick is kept; the next
                tick reads the same rows again).
        """
        with self._lock:
            if not self._loaded:
                self.load()
            now = self._now()
            write = RolloutWrite()
            cursor = dict(self._cursor)
            if self._live:
                self._feed_registry(now, write)
                self._feed_history(cursor, now, write)
                for live in list(self._live.values()):
                    self._step(live, Tick(now=now), write)
            else:
                cursor = self._store.history_heads()
                self._known = None
            write.cursor = cursor
            self._commit(write, now)
            self._cursor = cursor

    def _feed_history(self, cursor: dict[str, int], now: float, write: RolloutWrite) -> None:
        while True:
            rows = self._store.events_after(cursor["events"], _READ_CHUNK)
            for row in rows:
                report = report_from_event(row, now)
                if report is not None:
                    self._report(report, write)
            if rows:
                log.debug("rollout runner: %s event(s) after %s for %s", len(rows), cursor["events"],
                          sorted(self._live))
                cursor["events"] = int(rows[-1]["id"])
            if len(rows) < _READ_CHUNK:
                break
        while True:
            rows = self._store.health_after(cursor["health"], _READ_CHUNK)
            for row in rows:
                report = report_from_health(row, now)
                if report is not None:
                    self._report(report, write)
            if rows:
                cursor["health"] = int(rows[-1]["id"])
            if len(rows) < _READ_CHUNK:
                break

    def _feed_registry(self, now: float, write: RolloutWrite) -> None:
        snapshot = {d["id"]: d for d in self._store.device_snapshot()}
        known, first = self._known, self._known is None
        for device_id, row in snapshot.items():
            before = None if known is None else known.get(device_id)
            info = _info(row)
            for live in list(self._live.values()):
                dev = live.state.devices.get(device_id)
                if dev is None:
                    if (before is None or first) and is_targeted(live.state.plan, info):
                        self._step(live, DeviceJoined(device_info=info, now=now), write)
                    continue
                online = row.get("online")
                if isinstance(online, bool) and online != dev.online:
                    self._step(live, DeviceOnline(device=device_id, online=online, now=now), write)
                    dev = live.state.devices[device_id]
                if dev.state not in ("assigned", "offline"):
                    continue
                s = live.state
                wanted = s.release.version if dev.target == "new" else \
                    s.previous.version if dev.target == "previous" and s.previous is not None else None
                if wanted is not None and row.get("release") == wanted:
                    # the status says it runs what it was assigned (a no-op sync sends no event)
                    self._step(live, DeviceReport(device=device_id, now=now, outcome="applied",
                                                  release_version=wanted), write)
                elif row.get("paused") and dev.target == "new":
                    self._step(live, DeviceReport(device=device_id, now=now, outcome="deferred",
                                                  release_version=None), write)
        self._known = snapshot

    def _report(self, report: DeviceReport, write: RolloutWrite) -> None:
        for live in list(self._live.values()):
            dev = live.state.devices.get(report.device)
            if dev is None:
                continue
            s = live.state
            versions = {s.release.version} | ({s.previous.version} if s.previous else set())
            if report.release_version is not None and report.release_version not in versions and dev.online \
                    and dev.state != "offline":
                continue
            if report.outcome == "applied" and dev.state == "applied" and dev.online \
                    and dev.version == report.release_version:
                wave = s.plan.waves[dev.wave]
                if not (report.health and wave.gates and dev.wave == s.wave):
                    continue
            self._step(live, report, write)

    # --- stepping and persisting ---------------------------------------------------------------------

    def _step(self, live: _Live, event: Event, write: RolloutWrite) -> None:
        old = live.state
        state, effects = step(old, event)
        live.state = state
        if effects or state.phase != old.phase or state.waves != old.waves or state.devices != old.devices:
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

    def _persist_one(self, live: _Live, write: RolloutWrite, now: float) -> None:
        s = live.state
        write.rollouts.append({"id": s.rollout_id, "release": s.release.version, "commit": s.release.commit,
                               "previous": s.previous.version if s.previous else None,
                               "plan": {"source": s.plan.source, "raw": s.to_dict()["plan"]["raw"]},
                               "state": s.to_dict(), "phase": s.phase, "wave": s.wave, "actor": live.actor,
                               "reason": live.reason, "created": live.created, "updated": now})
        counts = wave_counts(s)
        if counts != live.last_counts:
            for k, c in enumerate(counts):
                write.samples.append({"rollout_id": s.rollout_id, "wave": k, "ts": now, **progress_counts(c)})
            live.last_counts = counts
        live.dirty = False

    def _commit(self, write: RolloutWrite, now: float) -> None:
        for live in self._live.values():
            if live.dirty:
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
            self._store.write_rollouts(write)
        for rid in [k for k, v in self._live.items()
                    if v.state.phase in ("aborted", "superseded")]:
            del self._live[rid]
        if write.assignments:
            self._publish_pending()

    def _publish_pending(self) -> None:
        published: list[tuple[str, int, str]] = []
        for row in self._store.assignments(unpublished=True):
            try:
                self._publish(row["device"], row["commit"], int(row["release"]), row["rollout_id"])
            except (BrokerError, MessageError) as exc:
                log.warning("cannot publish the assignment of %s (retried next tick): %s", row["device"], exc)
                continue
            published.append((row["device"], int(row["release"]), row["rollout_id"]))
        self._store.mark_published(published, self._clock())

    # --- reading -----------------------------------------------------------------------------------

    def state(self, rollout_id: str) -> RolloutState | None:
        """Return the current state of a rollout (from memory when live, else from the store).

        Raises:
            StateError: the database cannot be read.
        """
        with self._lock:
            live = self._live.get(rollout_id)
            if live is not None:
                return live.state
        row = self._store.rollout_row(rollout_id)
        return None if row is None else RolloutState.from_dict(row["state"])

    def summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return rollouts newest first without their device maps (for listings).

        Raises:
            StateError: the database cannot be read.
        """
        rows = self._store.rollout_summaries(limit)
        for row in rows:
            samples = self._store.latest_rollout_samples(row["id"])
            row["wave_count"] = len(samples)
            row["waves"] = [{"progress": {k: s[k] for k in _PROGRESS_KEYS}} for s in samples]
        return rows

    def metrics_snapshot(self) -> list[dict[str, Any]]:
        """Return per held rollout its id, release, phase, wave, device counts per wave and gate
        decisions per wave (``{"passed": n, "failed": n}``), for the Prometheus collector."""
        out = []
        for s in self.live_states():
            gates = [{"passed": 0, "failed": 0} for _ in s.plan.waves]
            for g in s.gates:
                gates[g.wave]["passed" if g.passed else "failed"] += 1
            out.append({"id": s.rollout_id, "release": s.release.version, "phase": s.phase, "wave": s.wave,
                        "waves": wave_counts(s), "gates": gates})
        return out

    def live_states(self) -> list[RolloutState]:
        """Return the states of the rollouts the runner holds (for metrics), newest first."""
        with self._lock:
            return [v.state for v in sorted(self._live.values(), key=lambda v: v.created, reverse=True)]

    # --- the API's read path ---------------------------------------------------------------------
    # ``describe`` and ``devices`` serve ``GET /api/v1/rollouts/{id}`` and ``.../devices``; written in
    # the simplest correct way over :meth:`state` until the incremental engine provides cheaper ones.
    # While a tick holds the lock they answer the state the API last read between two ticks (states
    # are immutable; at most one tick old) instead of waiting for the tick to end.

    def _api_state(self, rollout_id: str) -> RolloutState | None:
        seen: dict[str, RolloutState] = self.__dict__.setdefault("_api_seen", {})
        if self._lock.acquire(blocking=False):
            try:
                live = self._live.get(rollout_id)
                if live is not None:
                    seen[rollout_id] = live.state
                    return live.state
                seen.pop(rollout_id, None)
            finally:
                self._lock.release()
        elif rollout_id in seen:
            return seen[rollout_id]
        return self.state(rollout_id)

    def describe(self, rollout_id: str) -> dict[str, Any] | None:
        """Return one rollout for the API without its per-device map: summary, waves with counts, gate
        decisions, audit, progress samples, and ``device_count``; None when unknown.

        Raises:
            StateError: the database cannot be read.
        """
        state = self._api_state(rollout_id)
        row = self._store.rollout_summary(rollout_id)
        if state is None or row is None:
            return None
        counts = wave_counts(state)
        waves = []
        for k, (wave, progress) in enumerate(zip(state.plan.waves, state.waves, strict=True)):
            waves.append({"index": k, "name": wave.name, "promotion": wave.promotion, "soak": wave.soak,
                          "started": progress.started, "soak_until": progress.soak_until,
                          "finished": progress.finished, "result": progress.result,
                          "states": counts[k], "progress": progress_counts(counts[k]),
                          "devices": sum(counts[k].values())})
        return {"id": rollout_id, "release": state.release.version, "commit": state.release.commit,
                "previous": state.previous.version if state.previous else None, "plan": state.plan.name,
                "phase": state.phase, "wave": state.wave, "halted_reason": state.halted_reason,
                "tripped": list(state.tripped), "superseded_by": state.superseded_by,
                "actor": row.get("actor"), "reason": row.get("reason"), "created": row["created"],
                "updated": row["updated"], "waves": waves, "device_count": len(state.devices),
                "gates": self._store.rollout_gates(rollout_id),
                "audit": self._store.rollout_audit(rollout_id),
                "samples": self._store.rollout_samples(rollout_id)}

    def devices(self, rollout_id: str, *, wave: int | None = None, state: str | None = None,
                offset: int = 0, limit: int = 100) -> dict[str, Any] | None:
        """Return one page of a rollout's devices ordered by id, only those of ``wave`` and in
        ``state`` when given: ``{"devices": [...], "total": n}`` (``total`` counts every match);
        None when the rollout is unknown.

        Raises:
            StateError: the database cannot be read.
        """
        current = self._api_state(rollout_id)
        if current is None:
            return None
        matches = [(d, s) for d, s in current.devices.items()
                   if (wave is None or s.wave == wave) and (state is None or s.state == state)]
        matches.sort(key=lambda item: item[0])
        page = matches[max(0, offset):max(0, offset) + max(0, limit)]
        return {"total": len(matches),
                "devices": [{"id": d, "wave": s.wave, "state": s.state, "reason": s.reason,
                             "online": s.online, "target": s.target, "version": s.version} for d, s in page]}

def _info(row: Mapping[str, Any]) -> DeviceInfo:
    labels = row.get("labels") if isinstance(row.get("labels"), Mapping) else {}
    return DeviceInfo(id=str(row["id"]), labels={str(k): str(v) for k, v in (labels or {}).items()},
                      profile=str(row.get("profile") or ""), online=row.get("online") is not False)
