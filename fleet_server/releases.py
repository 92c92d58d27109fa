"""The Git watcher: notices new signed releases on the mirror, verifies them, records them, nudges.

``GitWatcher`` fetches the branch head of the fleet's config repository through
:class:`edge_core.source.Source` and checks each new head exactly as a device does, with the one
verifier :func:`edge_core.trust.verify.verify_tree`: root rotations in ``.fleet/root/``, the release
manifest's signatures, threshold and expiry, then every file of the tree against the manifest. A
release that passes is recorded in the store (``record_release``); when it is new, the
``publish_nudge(revision, release)`` callback gets it (in ``fleet-server``, ``GitPlans.on_release``:
it moves the fleet baseline and nudges every device, or starts the rollout that governs the release
and nudges no one). A head that fails is
refused: counted in :class:`fleet_server.metrics.ReleaseMetrics` by reason, logged at warning,
recorded in the audit log (action ``release_refused``, actor ``git-watcher``) and never published.
Each head commit is judged once; the next poll skips it.

With ``git.trust.allowed_signers`` the head commit must first carry an SSH signature by a key of
that file (:func:`edge_core.trust.sshsig.verify_commit`, the check devices with
``trust.allowed_signers`` make); otherwise it is refused as ``commit_signature`` with the reason
the devices give.

A mirror going backwards is refused too: a head whose release is older than the newest recorded
one is ``rollback`` (a force-pushed older release, or a new commit carrying an older release's
tree); a head carrying the newest recorded release at another commit is ``replayed_tree``.

It polls every ``git.poll_interval`` seconds in a thread of its own; :meth:`GitWatcher.trigger`
(called by the webhook) wakes it at once. A webhook that reached another replica (which runs no
watcher) is counted in the store as a poll request; the leader's watcher reads the count every
second and polls when it moved (a count, not a time: the replicas' clocks need not agree).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge_core.errors import (
    ConfigError,
    ExpiredError,
    FetchError,
    FileIntegrityError,
    ManifestError,
    PathError,
    RootRotationError,
    SignatureError,
    ThresholdError,
    UntrustedInputError,
    UntrustedKeyError,
)
from edge_core.source import Source
from edge_core.trust.sshsig import AllowedSigners, parse_allowed_signers, verify_commit
from edge_core.trust.verify import TrustRoot, VerifiedRelease, verify_tree
from fleet_server.errors import ServerConfigError, StoreError
from fleet_server.metrics import ReleaseMetrics
from fleet_server.refusals import AUDIT_ACTION, AUDIT_ACTOR

if TYPE_CHECKING:
    from fleet_server.config import ServerConfig

__all__ = ["GitWatcher", "PollOutcome", "ReleaseRecorder", "refusal_reason"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0
_REQUEST_CHECK_S = 1.0
"""Seconds between two looks at the stored poll request (``poll_requests``)."""


class ReleaseRecorder(Protocol):
    """The part of the store the watcher uses (``fleet_server.store.Store`` provides it)."""

    def record_release(self, version: int, commit: str, signers: Sequence[str], seen_at: float, *,
                       committed_at: float | None = None) -> bool:
        """Record a verified release (``committed_at``: its commit time); False when already known."""
        ...

    def releases(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return the newest recorded releases first."""
        ...

    def release_commit(self, version: int) -> str | None:
        """Return the commit of a recorded release, or None when it is unknown."""
        ...

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Append one entry to the audit log."""
        ...


class _Refused(Exception):
    """A head commit the watcher refuses: ``code`` is the metric label, the message the reason, and
    ``cause`` the verifier's own error when the verifier refused it (logged as it is, so the log names
    the same error class as a device's refusal)."""

    def __init__(self, code: str, message: str, release: int | None = None, *,
                 cause: Exception | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.release = release
        self.cause = cause


@dataclass(frozen=True)
class PollOutcome:
    """What one poll found.

    Attributes:
        status: ``fetch_failed``, ``unchanged`` (head already judged), ``refused``, ``known`` (a valid
            release already recorded) or ``new`` (recorded now and nudged).
        commit: the head commit, when the fetch worked.
        release: the release version, when the head verified.
        reason: the refusal code or fetch error text, when there is one.
    """

    status: str
    commit: str | None = None
    release: int | None = None
    reason: str | None = None


def refusal_reason(exc: UntrustedInputError) -> str:
    """Return the short, stable code a refused release is counted under for ``exc``."""
    if isinstance(exc, UntrustedKeyError):
        return "unsigned"
    if isinstance(exc, ThresholdError):
        return "threshold"
    if isinstance(exc, ExpiredError):
        return "expired"
    if isinstance(exc, RootRotationError):
        return "bad_root"
    if isinstance(exc, FileIntegrityError):
        return "tampered"
    if isinstance(exc, (ManifestError, PathError)):
        return "malformed"
    return "invalid"


class GitWatcher:
    """Watches the fleet's Git mirror for new signed releases.

    Args:
        config: the server configuration; its ``git`` section names the mirror, branch, poll
            interval, trusted keys and threshold, the allowed commit signers, and the cache directory.
        store: where verified releases are recorded.
        publish_nudge: called with ``(revision, release)`` for every newly recorded release.
        metrics: counters for polls, verified and refused releases (a private registry when None).
        notify: called as ``notify("release.refused", data)`` for each refused head (webhooks).
        clock: returns the current time (timezone-aware); expiry is checked against it.
        poll_requests: returns how many polls were requested through the store (webhooks on other
            replicas); a count other than the last one seen makes the watcher poll now.

    Raises:
        ServerConfigError: the ``git`` section has no ``url``.
        ConfigError: the trusted keys or threshold are invalid.
        ServerConfigError: ``git.trust.allowed_signers`` cannot be read or parsed (it is read once,
            here).
    """

    def __init__(self, config: ServerConfig, store: ReleaseRecorder,
                 publish_nudge: Callable[[str, int], None], *, metrics: ReleaseMetrics | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 notify: Callable[[str, Mapping[str, Any]], object] | None = None,
                 poll_requests: Callable[[], int] | None = None) -> None:
        git = config.git
        if not git.url:
            raise ServerConfigError("git.url: the Git watcher needs the mirror's URL")
        if metrics is None:
            metrics = ReleaseMetrics()
        self.metrics = metrics
        self._source = Source(git.url, git.branch, Path(git.cache_dir), limits=git.fetch_limits)
        self._trust = TrustRoot(keys=frozenset(git.trust.keys), threshold=git.trust.threshold)
        self._signers = _load_signers(git.trust.allowed_signers)
        self._interval = float(git.poll_interval)
        self._store = store
        self._publish_nudge = publish_nudge
        self._clock = clock
        self._notify = notify
        self._poll_requests = poll_requests
        self._seen_requests: int | None = None
        self._last_commit: str | None = None
        self._poll_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one poll -------------------------------------------------------------------------------

    def poll_once(self) -> PollOutcome:
        """Fetch the branch head and judge it if it is new; return what happened.

        Fetch failures are counted and returned (``fetch_failed``), never raised: the next poll
        retries. A refused head is counted, logged and remembered so it is judged once.
        """
        with self._poll_lock:
            try:
                fetched = self._source.fetch()
            except FetchError as exc:
                self.metrics.poll(ok=False)
                log.warning("git watcher: fetch failed: %s", exc)
                return PollOutcome("fetch_failed", reason=str(exc))
            self.metrics.poll(ok=True)
            commit = fetched.commit
            if commit == self._last_commit:
                return PollOutcome("unchanged", commit=commit)
            try:
                release, commit_time = self._verify(commit)
            except FetchError as exc:
                log.warning("git watcher: cannot read %s from the cache: %s", commit, exc)
                return PollOutcome("fetch_failed", commit=commit, reason=str(exc))
            except UntrustedInputError as exc:
                self._last_commit = commit
                return self._refuse(commit, _Refused(refusal_reason(exc), str(exc), cause=exc))
            except _Refused as refusal:
                self._last_commit = commit
                return self._refuse(commit, refusal)
            try:
                self._check_not_backwards(commit, release.version)
            except _Refused as refusal:
                self._last_commit = commit
                return self._refuse(commit, refusal)
            self._last_commit = commit
            return self._record(commit, release, commit_time)

    def _refuse(self, commit: str, refusal: _Refused) -> PollOutcome:
        """Count, log, record and notify a refused head; a store failure is logged, never raised."""
        code, message = refusal.code, str(refusal)
        self.metrics.refused(code)
        log.warning("git watcher: refused %s (%s): %s", commit, code, refusal.cause or message)
        detail: dict[str, Any] = {"code": code}
        if refusal.release is not None:
            detail["release"] = refusal.release
        try:
            self._store.add_audit(AUDIT_ACTOR, AUDIT_ACTION, commit, message, detail,
                                  now=self._clock().timestamp())
        except StoreError as exc:
            log.error("git watcher: cannot record the refusal of %s: %s", commit, exc)
        if self._notify is not None:
            self._notify("release.refused", {"commit": commit, "reason": code, "detail": message[:500]})
        return PollOutcome("refused", commit=commit, release=refusal.release, reason=code)

    def _verify(self, commit: str) -> tuple[VerifiedRelease, float]:
        if self._signers is not None:
            try:
                signer = verify_commit(self._source.commit_raw(commit), self._signers)
            except SignatureError as exc:       # the same one-line reason a device gives
                raise _Refused("commit_signature", str(exc)) from exc
            log.info("git watcher: commit %s is signed by %s", commit, signer)
        tree = self._source.read_tree(commit)
        release, trust = verify_tree(tree, self._trust, now=self._clock(), floor=0)
        if trust != self._trust:
            log.info("git watcher: trust root moved to version %s", trust.version)
            self._trust = trust
        return release, float(self._source.commit_time(commit))

    def _record(self, commit: str, release: VerifiedRelease, commit_time: float) -> PollOutcome:
        is_new = self._store.record_release(release.version, commit, sorted(release.signers),
                                            self._clock().timestamp(), committed_at=commit_time)
        if not is_new:
            log.info("git watcher: release %s at %s is already recorded", release.version, commit)
            return PollOutcome("known", commit=commit, release=release.version)
        self.metrics.verified()
        log.info("git watcher: new signed release %s at %s", release.version, commit)
        self._publish_nudge(commit, release.version)
        return PollOutcome("new", commit=commit, release=release.version)

    def _check_not_backwards(self, commit: str, version: int) -> None:
        """Refuse a head whose release is older than the newest recorded one, or that carries a
        recorded release at another commit.

        Raises:
            _Refused: ``rollback`` (older than the newest recorded release) or ``replayed_tree`` (the
                newest release's tree at a commit other than the one recorded).
        """
        newest = self._store.releases(limit=1)
        newest_version = int(newest[0]["version"]) if newest else version
        if version < newest_version:
            raise _Refused("rollback", f"release {version} is older than release {newest_version}, "
                           "the newest the fleet server recorded: the mirror went backwards", version)
        recorded = self._store.release_commit(version)
        if recorded is not None and recorded != commit:
            raise _Refused("replayed_tree", f"release {version} was recorded at commit {recorded}; "
                           f"commit {commit} carries it again", version)

    # -- the thread -----------------------------------------------------------------------------

    def trigger(self) -> None:
        """Wake the watcher to poll now (the webhook calls this); returns at once."""
        self._wake.set()

    def start(self) -> None:
        """Start polling in a background thread (one poll at once, then every poll interval).

        Raises:
            RuntimeError: the watcher is already running.
        """
        if self._thread is not None:
            raise RuntimeError("the git watcher is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="git-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._new_request()  # a request older than this start is answered by its first poll
        while not self._stopping.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug must not end the watcher; it is logged with its traceback
                log.exception("git watcher: poll failed unexpectedly")
            self._wait_for_next_poll()
            self._wake.clear()

    def _wait_for_next_poll(self) -> None:
        """Wait for the poll interval, a trigger, a new poll request in the store, or the stop."""
        deadline = time.monotonic() + self._interval
        while (left := deadline - time.monotonic()) > 0:
            step = left if self._poll_requests is None else min(left, _REQUEST_CHECK_S)
            if self._wake.wait(step) or self._new_request():
                return

    def _new_request(self) -> bool:
        """Whether the count of poll requests in the store moved since it was last read (the first
        read only remembers it)."""
        if self._poll_requests is None:
            return False
        try:
            requests = self._poll_requests()
        except StoreError as exc:
            log.debug("git watcher: cannot read the poll requests: %s", exc)
            return False
        seen, self._seen_requests = self._seen_requests, requests
        return seen is not None and requests != seen

    def stop(self) -> None:
        """Stop the polling thread (after a poll in progress ends) and close the Git cache."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
        with self._poll_lock:
            self._source.close()


def _load_signers(path: Path | None) -> AllowedSigners | None:
    """Read and parse ``git.trust.allowed_signers`` (None: commit signatures are not required)."""
    if path is None:
        return None
    try:
        return parse_allowed_signers(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServerConfigError(f"git.trust.allowed_signers: cannot read {path}: {exc.strerror}") from exc
    except (ConfigError, UnicodeDecodeError) as exc:
        raise ServerConfigError(f"git.trust.allowed_signers: {path}: {exc}") from exc
