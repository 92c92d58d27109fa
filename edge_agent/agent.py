"""The agent's work, one call each: sync a release, show a plan, check drift, pause, report status.

A sync is ``fetch -> verify -> select -> plan -> apply -> record``:

1. take the apply lock (``state_dir/apply.lock``; a second apply fails at once with LockedError);
2. undo any transaction a crash left open (our recovery rule is "undo, then converge": the journal
   restores every backed-up path, then this very sync re-applies the release from scratch);
3. fetch what :mod:`edge_agent.selection` chooses (the revision the fleet server assigned, else the
   fleet baseline, else the branch head) from the mirror; a transport failure ends the sync as
   ``fetch_failed`` and the device stays as it is;
4. verify: trust-root rotations under ``.fleet/root/`` first, then the manifest signature
   threshold, expiry and rollback floor, then every file of the tree against the manifest. Any
   failure ends the sync as ``refused`` with the one-line reason, before anything touches the
   device; a release older than the installed one is refused the same way unless the fleet server
   assigned it (the monotonic rule of :mod:`edge_agent.selection`); a success raises the local
   rollback floor;
5. select the bundles for this device, probe the drivers of the kinds in use (a kind whose driver
   cannot work here refuses the whole release, with the probe's reason), plan, and apply in one
   transaction with the release's health checks (failure -> ``rolled_back``);
6. record the installed release, an event, and an outbox message for the reporter.

A paused device (``edge-agent pause``) still fetches and verifies, so it keeps its rollback floor
current, but applies nothing: the outcome is ``paused``.

Outcomes: ``applied`` | ``noop`` | ``rolled_back`` | ``failed`` | ``refused`` | ``fetch_failed`` |
``paused``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent import reporter, selection, telemetry
from edge_agent.config import AgentConfig
from edge_agent.drivers.base import Context, probe_kinds
from edge_agent.engine.drift import DriftFinding, detect_drift
from edge_agent.engine.health import CheckResult, run_checks
from edge_agent.engine.plan import Plan, make_plan, plan_document, render_plan
from edge_agent.engine.transaction import Outcome, apply_plan, recover
from edge_agent.errors import LockedError
from edge_agent.fsafe import FsRoot
from edge_agent.identity import load_encryption_private
from edge_agent.prefetch import Prefetched, open_source
from edge_agent.release import DesiredState, DeviceIdentity, select
from edge_agent.runner import CommandEnv, Runner
from edge_agent.state import Managed, StateDB
from edge_core import messages
from edge_core.errors import (
    ConfigError,
    DriverUnavailable,
    FetchError,
    MessageError,
    RollbackError,
    StateError,
    UntrustedInputError,
)
from edge_core.logs import log_context, release_words
from edge_core.profiles import DeviceProfile, load_profile
from edge_core.resources import SecretFile
from edge_core.source import Source
from edge_core.trust.keys import PrivateKey
from edge_core.trust.sealed import open_sealed
from edge_core.trust.sshsig import parse_allowed_signers, verify_commit
from edge_core.trust.verify import (
    TrustRoot,
    VerifiedRelease,
    recheck_release,
    tree_index,
    verify_tree,
)

__all__ = [
    "DriftReport",
    "SyncCache",
    "SyncResult",
    "apply_lock",
    "assigned_revision",
    "check_drift",
    "event_payload",
    "pause",
    "plan_only",
    "recover_interrupted",
    "report_health",
    "resume",
    "set_assigned_revision",
    "status",
    "sync_once",
]

log = logging.getLogger(__name__)

STATE_DB = "state.db"
LOCK_FILE = "apply.lock"
BACKUP_DIR = "backups"
DIGEST_KEY_FILE = "digest.key"
_META_PAUSED = "paused"
_META_TREE = "installed_tree_digest"
_META_SYNC_STATE = "report.sync_state"
_META_DRIFT = "report.drift"
_META_ASSIGNED = selection.META_ASSIGNED
_MAX_MOUNTS = 16
_COMMIT_RE = re.compile(r"[0-9a-f]{7,64}")
SECRET_SUFFIX = ".sealed.json"  # noqa: S105 - a file name suffix, not a secret


@dataclass(frozen=True)
class SyncResult:
    """What one sync did; ``reason`` and ``step`` say why when it did not apply."""

    outcome: str
    version: int | None = None
    commit: str | None = None
    reason: str | None = None
    step: str | None = None
    changes: int = 0


@dataclass(frozen=True)
class DriftReport:
    """What a drift check found and whether it was corrected (``outcome`` of the correction)."""

    findings: tuple[DriftFinding, ...]
    corrected: bool
    outcome: str | None = None


@dataclass
class _Runtime:
    """Everything one operation needs, built from the config for the duration of the call."""

    config: AgentConfig
    state: StateDB
    profile: DeviceProfile
    ctx: Context
    runner: Runner
    source: Source

    def close(self) -> None:
        """Release the state database and the device root."""
        try:
            self.state.close()
        finally:
            self.ctx.fs.close()
            self.source.close()


@dataclass(frozen=True)
class _Verified:
    commit: str
    release: VerifiedRelease
    tree: Mapping[str, bytes]
    trust: TrustRoot
    trust_changed: bool


@dataclass
class SyncCache:
    """What a long-running daemon keeps between syncs: the last verified commit and its desired state.

    When the mirror still points at that commit and the trust root is unchanged, a sync skips
    re-reading, re-hashing, re-verifying and re-parsing the tree; expiry and the rollback floor are
    checked again every time.
    """

    verified: _Verified | None = None
    desired: DesiredState | None = None


# --- plumbing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def apply_lock(state_dir: Path) -> Iterator[None]:
    """Hold the exclusive apply lock of ``state_dir`` for the block.

    Raises:
        LockedError: another process (or thread) holds it.
        StateError: the lock file cannot be created.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open the apply lock in {state_dir}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(f"another apply holds {state_dir / LOCK_FILE}") from exc
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _digest_key(state_dir: Path) -> bytes:
    """Return the device-local HMAC key for secret digests, creating it (0600) on first use."""
    path = state_dir / DIGEST_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(key) != 32:
        raise StateError(f"{path} is corrupt; remove it to start over")
    return key


def _secret_opener(state_dir: Path) -> Callable[[SecretFile, bytes], bytes]:
    """Return a function opening a sealed document for a secret_file with this device's key.

    The expected secret id is the sealed file's name without ``.sealed.json``
    (``secrets/wifi-psk.sealed.json`` -> ``wifi-psk``), so a sealed file cannot be moved to another
    name. The device key is loaded on first use only.
    """
    cache: list[PrivateKey] = []

    def opener(res: SecretFile, document: bytes) -> bytes:
        if not cache:
            cache.append(load_encryption_private(state_dir))
        name = res.secret.rsplit("/", 1)[-1]
        expected = name.removesuffix(SECRET_SUFFIX)
        # Imported on first use: a release without secrets never loads the envelope code.

        return open_sealed(document, expected_id=expected, key=cache[0])

    return opener


def _open_runtime(config: AgentConfig) -> _Runtime:
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    profile = load_profile(config.profile, list(config.profile_dirs))
    backups = state_dir / BACKUP_DIR
    backups.mkdir(exist_ok=True, mode=0o700)
    key = _digest_key(state_dir)
    source = open_source(config)
    fs = FsRoot(config.root, profile.allowed_roots, denied_roots=profile.denied_roots, blob_key=key)
    try:
        state = StateDB(state_dir / STATE_DB)
    except BaseException:
        fs.close()
        raise
    runner = Runner()
    ctx = Context(
        fs=fs, runner=runner, payloads={}, open_secret=_secret_opener(state_dir), backup_store=backups,
        secret_digest=lambda data: hmac.new(key, data, hashlib.sha256).hexdigest(),
        command_env=CommandEnv(device=config.device_id),
    )
    return _Runtime(config=config, state=state, profile=profile, ctx=ctx, runner=runner, source=source)


def _with_payloads(ctx: Context, payloads: Mapping[str, bytes], version: int, commit: str) -> Context:
    who = replace(ctx.command_env, release=version, commit=commit)
    return replace(ctx, payloads=payloads, command_env=who)


def _as_commit(value: str | None) -> str | None:
    """Return ``value`` when it is a full or abbreviated lower-case hex commit id, else None."""
    return value if value is not None and _COMMIT_RE.fullmatch(value) else None


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _iso(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- verification --------------------------------------------------------------------------------


def _stored_trust(config: AgentConfig, state: StateDB) -> TrustRoot:
    """The trust root to verify with: the persisted one once it was rotated, else the config's.

    Until the fleet rotates its keys the config file is the source of truth (so an operator can
    re-provision a device by editing agent.yaml); after a verified rotation the persisted root wins.
    """
    data = state.trust_root()
    if data:
        try:
            stored = TrustRoot(keys=frozenset(str(k) for k in data["keys"]), threshold=int(data["threshold"]),
                               version=int(data["version"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"the stored trust root is malformed: {exc}") from exc
        if stored.version > 1:
            return stored
    return TrustRoot(keys=frozenset(config.trust.keys), threshold=config.trust.threshold)


def _tree_digest(tree: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for path, (digest, size) in sorted(tree_index(tree).items()):
        h.update(f"{path}\0{digest}\0{size}\n".encode())
    return h.hexdigest()


def _fetch_and_verify(rt: _Runtime, want: str | None, now: datetime, seen: list[str] | None = None, *,
                      cache: SyncCache | None = None, prefetched: Prefetched | None = None) -> _Verified:
    """Fetch, then verify the tree completely (``seen`` receives the fetched commit).

    With a ``cache`` holding this very commit under the same trust root, only expiry and the
    rollback floor are checked again (the tree, its hashes and signatures cannot have changed).

    ``prefetched``, when it fetched this very ``want``, stands for the fetch (:mod:`edge_agent.prefetch`).

    Raises FetchError or an UntrustedInputError.
    """
    ready = prefetched is not None and prefetched.want == want
    fetched = prefetched.get() if prefetched is not None and ready else rt.source.fetch(want)
    if seen is not None:
        seen.append(fetched.commit)
    hit = None if cache is None else cache.verified
    if (hit is not None and hit.commit == fetched.commit
            and hit.trust == _stored_trust(rt.config, rt.state)):
        recheck_release(hit.release, now=now, floor=rt.state.floor())
        return hit
    with log_context(commit=fetched.commit):
        if rt.config.trust.allowed_signers is not None:
            _check_commit_signature(rt, fetched.commit)
        tree = rt.source.read_tree(fetched.commit)
        current = _stored_trust(rt.config, rt.state)
        release, trust = verify_tree(tree, current, now=now, floor=rt.state.floor())
    return _Verified(commit=fetched.commit, release=release, tree=tree, trust=trust,
                     trust_changed=trust != current)


def _check_commit_signature(rt: _Runtime, commit: str) -> None:
    """Require an SSH signature on ``commit`` by a key of ``trust.allowed_signers`` (opt-in).

    Raises:
        ConfigError: the allowed-signers file cannot be read or parsed.
        SignatureError, UntrustedKeyError: the commit is unsigned, badly signed, or by another key.
    """
    path = rt.config.trust.allowed_signers
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"trust.allowed_signers: cannot read {path}: {exc.strerror}") from exc
    # Imported on first use: only devices with trust.allowed_signers check SSH-signed commits.

    signer = verify_commit(rt.source.commit_raw(commit), parse_allowed_signers(text))
    log.info("commit %s is signed by %s", commit, signer)


def _persist_trust(state: StateDB, verified: _Verified) -> None:
    if verified.trust_changed:
        t = verified.trust
        state.set_trust_root({"keys": sorted(t.keys), "threshold": t.threshold, "version": t.version})
        state.add_event("trust_rotated", {"version": t.version, "threshold": t.threshold,
                                          "keys": len(t.keys)})
        log.info("trust root rotated to version %s", t.version)


def _desired(rt: _Runtime, tree: Mapping[str, bytes]) -> DesiredState:
    device = DeviceIdentity(id=rt.config.device_id, labels=dict(rt.config.labels), profile=rt.config.profile)
    return select(tree, device, rt.profile)


def _unavailable(desired: DesiredState, rt: _Runtime, ctx: Context) -> dict[str, str]:
    """Probe the driver of every kind the release uses; return kind -> reason for the unusable ones."""
    kinds = {r.kind for r in desired.resources}
    out = {k: f"the device profile {rt.profile.name} does not allow {k} resources"
           for k in sorted(kinds - set(rt.profile.drivers))}
    out.update(probe_kinds(kinds & set(rt.profile.drivers), ctx))
    return out


# --- records -------------------------------------------------------------------------------------


def event_payload(config: AgentConfig, kind: str, *, now: datetime, commit: str | None,
                  release: int | None, reason: str | None, **extra: Any) -> bytes:
    """Return the JSON bytes of one ``<prefix>/<device>/events`` message, built by :mod:`edge_agent.reporter`.

    ``kind`` is a local event kind: ``sync_<outcome>`` (``extra``: ``step``, ``changes``),
    ``drift_detected`` / ``drift_corrected`` (``extra``: ``resources``), ``paused``, ``resumed`` or
    ``recovered`` (``extra``: ``status``).

    Raises:
        MessageError: an unknown kind (or an outcome that sends no event) or an invalid field.
    """
    return messages.encode(_event_message(config, kind, now=now, commit=commit, release=release,
                                          reason=reason, **extra))


def _event_message(config: AgentConfig, kind: str, *, now: datetime, commit: str | None,
                   release: int | None, reason: str | None, **extra: Any) -> dict[str, Any]:
    device = config.device_id
    if kind.startswith("sync_"):
        msg = reporter.sync_event(device, outcome=kind.removeprefix("sync_"), commit=commit, release=release,
                                  ts=now, reason=reason, step=extra.get("step"),
                                  changes=int(extra.get("changes", 0)))
        if msg is None:
            raise MessageError("bad_field", f"the sync outcome of {kind!r} is not reported as an event")
    elif kind in ("drift_detected", "drift_corrected"):
        msg = reporter.drift_event(device, corrected=kind == "drift_corrected",
                                   resources=list(extra.get("resources", ())), commit=commit,
                                   release=release, ts=now, mode=config.mode)
    elif kind in ("paused", "resumed"):
        msg = reporter.pause_event(device, paused=kind == "paused", reason=reason, commit=commit,
                                   release=release, ts=now)
    elif kind == "recovered":
        msg = reporter.recovery_event(device, status=str(extra.get("status", "rolled_back")), reason=reason,
                                      commit=commit, release=release, ts=now)
    else:
        raise MessageError("bad_field", f"unknown event kind {kind!r}")
    return msg


def _record(rt: _Runtime, kind: str, *, now: datetime, commit: str | None, release: int | None,
            reason: str | None, **extra: Any) -> None:
    """Add one event to the local history and queue its report (see :func:`event_payload`)."""
    rt.state.add_event(kind, {"commit": commit, "release": release, "reason": reason, **extra})
    msg = _event_message(rt.config, kind, now=now, commit=commit, release=release, reason=reason, **extra)
    reporter.queue_report(rt.state, rt.config.mqtt_prefix, "events", msg)


def _drift_state(state: StateDB) -> dict[str, Any]:
    text = state.get_meta(_META_DRIFT)
    if text:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
    return reporter.drift_summary((), corrected=False)


def _queue_status(state: StateDB, config: AgentConfig, now: datetime) -> None:
    """Queue the retained status: installed release, sync state, drift summary, paused, labels, profile."""
    installed = state.installed()
    msg = reporter.status_report(
        config.device_id, commit=installed.commit if installed else None,
        release=installed.version if installed else None,
        sync_state=state.get_meta(_META_SYNC_STATE) or "unknown", drift=_drift_state(state),
        paused=bool(state.get_meta(_META_PAUSED)), ts=now, labels=config.labels, profile=config.profile)
    reporter.queue_report(state, config.mqtt_prefix, "status", msg)


def _finish(rt: _Runtime, result: SyncResult, now: datetime, *, quiet: bool = False) -> SyncResult:
    if not quiet:
        rt.state.add_event("sync_" + result.outcome, {"commit": result.commit, "release": result.version,
                                                      "reason": result.reason, "step": result.step,
                                                      "changes": result.changes})
        event = reporter.sync_event(rt.config.device_id, outcome=result.outcome, commit=result.commit,
                                    release=result.version, ts=now, reason=result.reason, step=result.step,
                                    changes=result.changes)
        if event is not None:
            reporter.queue_report(rt.state, rt.config.mqtt_prefix, "events", event)
    rt.state.set_meta(_META_SYNC_STATE, reporter.SYNC_STATES.get(result.outcome, result.outcome))
    if result.outcome in ("applied", "noop"):
        rt.state.set_meta(_META_DRIFT, json.dumps(reporter.drift_summary((), corrected=False)))
    _queue_status(rt.state, rt.config, now)
    level = logging.INFO if result.outcome in ("applied", "noop", "paused") else logging.WARNING
    log.log(level, "sync %s: %s changes %s%s", result.outcome, release_words(result.version, result.commit),
            result.changes, f" ({result.reason})" if result.reason else "")
    return result


def _make_checks(desired: DesiredState, rt: _Runtime, ctx: Context) -> Callable[[], list[CheckResult]]:
    def checks() -> list[CheckResult]:
        return run_checks(desired.checks, rt.runner, rt.config.root, ctx.command_env)

    return checks


def _apply(rt: _Runtime, desired: DesiredState, plan: Plan, managed: Mapping[str, Managed], *, version: int,
           commit: str) -> Outcome:
    ctx = _with_payloads(rt.ctx, desired.payloads, version, commit)
    return apply_plan(plan, desired, ctx, rt.state, txn_id=secrets.token_hex(16), version=version,
                      commit=commit, run_checks=_make_checks(desired, rt, ctx), managed=managed)


# --- the operations ------------------------------------------------------------------------------


def sync_once(config: AgentConfig, *, want: str | None = None, now: datetime | None = None,
              cache: SyncCache | None = None, assigned: str | None = None,
              prefetched: Prefetched | None = None) -> SyncResult:
    """Run one fetch -> verify -> select -> plan -> apply -> record cycle.

    Args:
        config: the validated agent configuration.
        want: a commit the device's operator asks for; None means what
            :func:`edge_agent.selection.choose` picks: the revision the fleet server assigned
            (``assigned``, else :func:`assigned_revision`), else the fleet baseline, else the branch
            head. It must pass every trust check either way, and only ``want`` or an assignment may
            be older than the installed release.
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
        rt = _open_runtime(config)
        try:
            target = selection.target_in(rt.state, want=want, assigned=assigned)
            return _sync_locked(rt, target, _now(now), cache, prefetched)
        finally:
            rt.close()


def _sync_locked(rt: _Runtime, target: selection.Target, now: datetime,
                 cache: SyncCache | None = None, prefetched: Prefetched | None = None) -> SyncResult:
    want = target.revision
    recovered = recover(rt.state, rt.ctx)
    try:
        rt.source.clear_stale_locks()  # under the cache's fetch lock: a lock file here outlived its process
    except FetchError as exc:
        return _finish(rt, SyncResult("fetch_failed", commit=_as_commit(want), reason=str(exc)), now)
    if recovered is not None:
        _record(rt, "recovered", now=now, commit=None, release=None, reason=recovered.reason,
                status=recovered.status)
    installed = rt.state.installed()
    seen: list[str] = []
    try:
        verified = _fetch_and_verify(rt, want, now, seen, cache=cache, prefetched=prefetched)
    except FetchError as exc:
        return _finish(rt, SyncResult("fetch_failed", commit=_as_commit(want), reason=str(exc)), now)
    except UntrustedInputError as exc:
        commit = _as_commit(seen[0] if seen else want)
        return _finish(rt, SyncResult("refused", commit=commit, reason=str(exc)), now)
    version, commit = verified.release.version, verified.commit
    try:
        selection.check_monotonic(target, version, installed)
    except RollbackError as exc:
        return _finish(rt, SyncResult("refused", version, commit, reason=str(exc)), now)
    with log_context(commit=commit, release=version):
        _persist_trust(rt.state, verified)
        rt.state.raise_floor(verified.release.rollback_floor)
        paused = rt.state.get_meta(_META_PAUSED)
        if paused:
            return _finish(rt, SyncResult("paused", version, commit, reason=f"paused: {paused}"), now,
                           quiet=installed is not None and installed.commit == commit)
        try:
            if cache is not None and cache.verified is verified and cache.desired is not None:
                desired = cache.desired
            else:
                desired = _desired(rt, verified.tree)
            ctx = _with_payloads(rt.ctx, desired.payloads, version, commit)
            missing = _unavailable(desired, rt, ctx)
            if missing:
                reason = "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
                raise DriverUnavailable(f"drivers unavailable on this device: {reason}")
            managed = rt.state.managed()
            plan = make_plan(desired, managed, ctx)
            if plan.unavailable:
                reason = "; ".join(f"{k}: {v}" for k, v in sorted(plan.unavailable.items()))
                raise DriverUnavailable(f"drivers unavailable on this device: {reason}")
        except (UntrustedInputError, DriverUnavailable) as exc:
            return _finish(rt, SyncResult("refused", version, commit, reason=str(exc)), now)
        if not plan.is_noop:
            started = reporter.started_event(rt.config.device_id, commit=commit, release=version, ts=now,
                                             changes=len(plan.all_changes))
            reporter.queue_report(rt.state, rt.config.mqtt_prefix, "events", started)
        outcome = _apply(rt, desired, plan, managed, version=version, commit=commit)
        result = SyncResult(outcome.status, version, commit, reason=outcome.reason, step=outcome.step,
                            changes=outcome.changes)
        same = installed is not None and installed.commit == commit
        if outcome.status in ("applied", "noop"):
            rt.state.set_installed(version, commit, list(desired.bundles))
            if not same or rt.state.get_meta(_META_TREE) is None:
                rt.state.set_meta(_META_TREE, _tree_digest(verified.tree))
            if cache is not None and cache.verified is not verified:
                cache.verified, cache.desired = replace(verified, trust_changed=False), desired
        return _finish(rt, result, now, quiet=outcome.status == "noop" and same)


def recover_interrupted(config: AgentConfig, *, now: datetime | None = None) -> None:
    """Undo a transaction a crash left open and record it, as the first step of every sync does (the
    daemon calls it at start, before its first fetch, so no drift check meets a half-applied release).

    Raises:
        LockedError: another apply is running (it recovers first itself).
        ConfigError: the device profile cannot be loaded.
        StateError: the state database cannot be used.
    """
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = _open_runtime(config)
        try:
            recovered = recover(rt.state, rt.ctx)
            if recovered is not None:
                _record(rt, "recovered", now=_now(now), commit=None, release=None, reason=recovered.reason,
                        status=recovered.status)
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
        rt = _open_runtime(config)
        try:
            verified = _fetch_and_verify(rt, want, _now(now))
            desired = _desired(rt, verified.tree)
            ctx = _with_payloads(rt.ctx, desired.payloads, verified.release.version, verified.commit)
            missing = _unavailable(desired, rt, ctx)
            if missing:
                reason = "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
                raise DriverUnavailable(f"drivers unavailable on this device: {reason}")
            plan = make_plan(desired, rt.state.managed(), ctx)
            if as_json:
                return json.dumps({"release": verified.release.version, "commit": verified.commit,
                                   **plan_document(plan)}, indent=2, sort_keys=True)
            header = f"release {verified.release.version} commit {verified.commit}\n"
            return header + render_plan(plan)
        finally:
            rt.close()


def _installed_desired(rt: _Runtime) -> tuple[DesiredState, int, str] | None:
    """Rebuild the desired state of the installed release from the local repository cache."""
    installed = rt.state.installed()
    if installed is None:
        return None
    tree = rt.source.read_tree(installed.commit)
    if _tree_digest(tree) != rt.state.get_meta(_META_TREE):
        raise StateError(f"the cached tree of commit {installed.commit} no longer matches what was verified")
    return _desired(rt, tree), installed.version, installed.commit


def check_drift(config: AgentConfig, *, now: datetime | None = None) -> DriftReport:
    """Compare the device with the installed release; in enforce mode correct it in a transaction.

    Drift is recorded in the state (``add_drift``), as an event and an outbox message
    (``drift_detected``, then ``drift_corrected`` when enforce mode fixed it), followed by the
    status report. A paused device or ``audit`` mode only records. Nothing is done when no release
    is installed yet; a clean check reports a new status only when drift had been reported before.

    Raises:
        LockedError: an apply is running (try again at the next drift interval).
        StateError: the state or the repository cache cannot be read.
    """
    when = _now(now)
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = _open_runtime(config)
        try:
            loaded = _installed_desired(rt)
            if loaded is None:
                return DriftReport((), False)
            desired, version, commit = loaded
            with log_context(commit=commit, release=version):
                ctx = _with_payloads(rt.ctx, desired.payloads, version, commit)
                managed = rt.state.managed()
                findings = tuple(detect_drift(desired, managed, ctx))
                if not findings:
                    if _drift_state(rt.state).get("count"):
                        _set_drift(rt.state, (), corrected=False, clean=True)
                        _queue_status(rt.state, config, when)
                    return DriftReport((), False)
                enforce = config.mode == "enforce" and not rt.state.get_meta(_META_PAUSED)
                outcome: Outcome | None = None
                if enforce:
                    plan = make_plan(desired, managed, ctx)
                    outcome = _apply(rt, desired, plan, managed, version=version, commit=commit)
                corrected = outcome is not None and outcome.status in ("applied", "noop")
                for f in findings:
                    rt.state.add_drift(f.resource_id, f.expected, f.found, corrected)
                ids = [f.resource_id for f in findings]
                _record(rt, "drift_detected", now=when, commit=commit, release=version, reason=None,
                        resources=ids)
                if corrected:
                    _record(rt, "drift_corrected", now=when, commit=commit, release=version, reason=None,
                            resources=ids)
                _set_drift(rt.state, ids, corrected=corrected, clean=corrected)
                _queue_status(rt.state, config, when)
                log.warning("drift in %s resource(s): %s; corrected=%s", len(ids), ", ".join(ids), corrected)
                return DriftReport(findings, corrected, outcome.status if outcome is not None else None)
        finally:
            rt.close()


def _set_drift(state: StateDB, ids: Sequence[str], *, corrected: bool, clean: bool) -> None:
    """Remember the last drift summary for the status; ``clean``: the device matches the release."""
    state.set_meta(_META_DRIFT, json.dumps(reporter.drift_summary(ids, corrected=corrected)))
    current = state.get_meta(_META_SYNC_STATE)
    if not clean:
        state.set_meta(_META_SYNC_STATE, "drifted")
    elif current in (None, "drifted"):
        state.set_meta(_META_SYNC_STATE, "in_sync")


def _set_pause(config: AgentConfig, reason: str | None, now: datetime | None) -> None:
    when = _now(now)
    with log_context(device=config.device_id):
        state_dir = config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = StateDB(state_dir / STATE_DB)
        try:
            installed = state.installed()
            commit = installed.commit if installed else None
            version = installed.version if installed else None
            kind = "paused" if reason is not None else "resumed"
            state.set_meta(_META_PAUSED, reason)
            state.add_event(kind, {"reason": reason, "commit": commit, "release": version})
            event = reporter.pause_event(config.device_id, paused=reason is not None, reason=reason,
                                         commit=commit, release=version, ts=when)
            reporter.queue_report(state, config.mqtt_prefix, "events", event)
            _queue_status(state, config, when)
            log.warning("%s%s", kind, f": {reason}" if reason else "")
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


def assigned_revision(config: AgentConfig) -> str | None:
    """Return the revision the fleet server assigned (persisted), or None to follow the branch head.

    Raises:
        StateError: the state database cannot be read.
    """
    if not (config.state_dir / STATE_DB).exists():
        return None
    state = StateDB(config.state_dir / STATE_DB)
    try:
        return state.get_meta(_META_ASSIGNED) or None
    finally:
        state.close()


def set_assigned_revision(config: AgentConfig, revision: str | None) -> None:
    """Persist the revision the fleet server assigned (None: follow the branch head again).

    :func:`sync_once` without ``want`` syncs to it; it still has to pass every trust check.

    Raises:
        StateError: the state database cannot be written.
    """
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = StateDB(config.state_dir / STATE_DB)
    try:
        state.set_meta(_META_ASSIGNED, revision)
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


def report_health(config: AgentConfig, *, now: datetime | None = None) -> list[CheckResult]:
    """Run the installed release's health checks and queue one health report with device metrics.

    Metrics come from ``telemetry.sample`` for ``/`` and the mounts of the managed paths. Each check
    is bounded by its own timeout; before the first release there are no checks. Holds the apply lock
    so that checks never watch a half-applied release.

    Raises:
        LockedError: an apply is running (report at the next health interval).
        StateError: the state or the repository cache cannot be read.
    """
    when = _now(now)
    with log_context(device=config.device_id), apply_lock(config.state_dir):
        rt = _open_runtime(config)
        try:
            loaded = _installed_desired(rt)
            desired = loaded[0] if loaded is not None else None
            who = CommandEnv(config.device_id, loaded[1], loaded[2]) if loaded is not None else None
            results = run_checks(desired.checks, rt.runner, config.root, who) if desired is not None else []
            metrics = telemetry.sample(_health_mounts(config, desired))
            msg = reporter.health_report(config.device_id, commit=loaded[2] if loaded else None,
                                         release=loaded[1] if loaded else None, ts=when, metrics=metrics,
                                         checks=results)
            reporter.queue_report(rt.state, config.mqtt_prefix, "health", msg)
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
        out.update({"installed": None, "floor": 0, "paused": None, "managed": 0, "open_transaction": None,
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
            "paused": state.get_meta(_META_PAUSED) or None,
            "managed": len(state.managed()),
            "open_transaction": None if open_txn is None else open_txn.txn_id,
            "last_sync": _last_sync(state),
            "outbox": state.outbox_count(),
        })
    finally:
        state.close()
    return out
