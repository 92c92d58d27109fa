"""The Git watcher against a real repository served by `git daemon` on loopback, and a real store."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

from edge_core.trust.keys import format_verify_key
from fleet_server.api import ApiActions, create_app
from fleet_server.config import GitConfig, GitTrust, HttpConfig, ServerConfig
from fleet_server.errors import ServerConfigError
from fleet_server.metrics import ServerMetrics
from fleet_server.releases import GitWatcher, PollOutcome
from fleet_server.signing import sign_release
from fleet_server.store import Store
from tests.support.api_server import serve_app
from tests.support.gitrepo import WorkRepo, git, make_bare
from tests.support.mirror import GitDaemon

HOOK_SECRET = b"hook-secret-for-tests"
WAIT_S = 15.0


@dataclass
class Fleet:
    """A config repository, its mirror served by git daemon, an operator key, a store, the nudges."""

    work: WorkRepo
    bare: Path
    daemon: GitDaemon
    key: SigningKey
    store: Store
    tmp: Path
    nudges: list[tuple[str, int]] = field(default_factory=list)
    nudged: threading.Event = field(default_factory=threading.Event)

    def config(self, *, poll_interval: float = 60.0, keys: tuple[str, ...] | None = None) -> ServerConfig:
        trusted = keys if keys is not None else (format_verify_key(self.key.verify_key),)
        hook = self.tmp / "hook.secret"
        hook.write_bytes(HOOK_SECRET)
        return ServerConfig(git=GitConfig(url=self.daemon.url("fleet.git"), branch="main",
                                          poll_interval=poll_interval, webhook_secret_file=hook,
                                          trust=GitTrust(keys=trusted, threshold=1),
                                          cache_dir=self.tmp / "git-cache"))

    def nudge(self, revision: str, release: int) -> None:
        self.nudges.append((revision, release))
        self.nudged.set()

    def release(self, files: dict[str, str | bytes], *, key: SigningKey | None = None) -> str:
        """Write files, sign them as the next release, commit and push; return the commit."""
        self.work.write_files(files)
        sign_release(self.work.path, [key or self.key], expires=timedelta(days=30), now=datetime.now(UTC))
        sha = self.work.commit("release")
        self.work.push(self.bare)
        return sha

    def watcher(self, *, poll_interval: float = 60.0) -> GitWatcher:
        return GitWatcher(self.config(poll_interval=poll_interval), self.store, self.nudge,
                          metrics=ServerMetrics().releases)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    mirrors = tmp_path / "mirrors"
    bare = make_bare(mirrors / "fleet.git")
    work = WorkRepo.create(tmp_path / "work")
    store = Store(tmp_path / "fleet.db")
    with GitDaemon(mirrors) as daemon:
        yield Fleet(work, bare, daemon, SigningKey.generate(), store, tmp_path)
    store.close()


def _sample(watcher: GitWatcher, name: str, **labels: str) -> float | None:
    return watcher.metrics.registry.get_sample_value(name, labels)


def _refused(watcher: GitWatcher, reason: str) -> float | None:
    return _sample(watcher, "fleet_releases_refused_total", reason=reason)


def _wait_for(event: threading.Event) -> None:
    assert event.wait(WAIT_S), "the watcher did not nudge in time"
    event.clear()


def test_new_signed_release_is_recorded_and_nudged(fleet: Fleet) -> None:
    sha = fleet.release({"bundles/base/bundle.yaml": "name: base\n"})
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once() == PollOutcome("new", commit=sha, release=1)
        assert fleet.nudges == [(sha, 1)]
        [recorded] = fleet.store.releases()
        assert (recorded["version"], recorded["commit"]) == (1, sha)
        assert recorded["signers"] == [format_verify_key(fleet.key.verify_key)]
        assert recorded["committed_at"] == int(git("log", "-1", "--format=%ct", cwd=fleet.work.path))
        assert watcher.poll_once() == PollOutcome("unchanged", commit=sha)
        assert fleet.nudges == [(sha, 1)]
        assert _sample(watcher, "fleet_releases_verified_total") == 1
        sha2 = fleet.release({"bundles/base/bundle.yaml": "name: base\nversion: 2\n"})
        assert watcher.poll_once() == PollOutcome("new", commit=sha2, release=2)
        assert fleet.nudges == [(sha, 1), (sha2, 2)]
    finally:
        watcher.stop()


def test_unsigned_commit_is_refused_once(fleet: Fleet) -> None:
    fleet.work.write("bundles/base/bundle.yaml", "name: base\n")
    sha = fleet.work.commit("no release manifest")
    fleet.work.push(fleet.bare)
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once() == PollOutcome("refused", commit=sha, reason="unsigned")
        assert watcher.poll_once() == PollOutcome("unchanged", commit=sha)
        assert _refused(watcher, "unsigned") == 1
        assert fleet.nudges == []
        assert fleet.store.releases() == []
    finally:
        watcher.stop()


def test_tampered_release_is_refused(fleet: Fleet) -> None:
    fleet.release({"bundles/base/bundle.yaml": "name: base\n"})
    fleet.work.write("bundles/base/bundle.yaml", "name: evil\n")   # changed after signing
    sha = fleet.work.commit("tamper")
    fleet.work.push(fleet.bare)
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once() == PollOutcome("refused", commit=sha, reason="tampered")
        assert _refused(watcher, "tampered") == 1
        assert fleet.nudges == []
    finally:
        watcher.stop()


def test_release_signed_by_an_untrusted_key_is_refused(fleet: Fleet) -> None:
    sha = fleet.release({"a.txt": "x\n"}, key=SigningKey.generate())
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once() == PollOutcome("refused", commit=sha, reason="unsigned")
        assert fleet.store.releases() == []
    finally:
        watcher.stop()


def test_expired_release_is_refused(fleet: Fleet) -> None:
    sha = fleet.release({"a.txt": "x\n"})
    later = datetime.now(UTC) + timedelta(days=31)
    watcher = GitWatcher(fleet.config(), fleet.store, fleet.nudge, clock=lambda: later)
    try:
        assert watcher.poll_once() == PollOutcome("refused", commit=sha, reason="expired")
    finally:
        watcher.stop()


def test_mirror_down_is_a_counted_fetch_failure(fleet: Fleet) -> None:
    fleet.release({"a.txt": "x\n"})
    watcher = fleet.watcher()
    try:
        fleet.daemon.stop()
        outcome = watcher.poll_once()
        assert outcome.status == "fetch_failed"
        assert _sample(watcher, "fleet_git_polls_total", result="error") == 1
        fleet.daemon.start()
        assert watcher.poll_once().status == "new"
    finally:
        watcher.stop()


def test_already_recorded_release_is_not_nudged_again(fleet: Fleet) -> None:
    sha = fleet.release({"a.txt": "x\n"})
    first = fleet.watcher()
    try:
        assert first.poll_once().status == "new"
    finally:
        first.stop()
    second = fleet.watcher()          # a restarted server: same store, fresh watcher
    try:
        assert second.poll_once() == PollOutcome("known", commit=sha, release=1)
        assert fleet.nudges == [(sha, 1)]
    finally:
        second.stop()


def test_polling_thread_notices_a_new_release(fleet: Fleet) -> None:
    fleet.release({"a.txt": "1\n"})
    watcher = fleet.watcher(poll_interval=0.2)
    watcher.start()
    try:
        _wait_for(fleet.nudged)
        sha2 = fleet.release({"a.txt": "2\n"})
        _wait_for(fleet.nudged)
        assert fleet.nudges[-1] == (sha2, 2)
    finally:
        watcher.stop()


def test_webhook_wakes_the_watcher_at_once(fleet: Fleet) -> None:
    fleet.release({"a.txt": "1\n"})
    config = fleet.config(poll_interval=3600.0)
    admin = fleet.tmp / "admin.token"
    admin.write_text("admin-token\n")
    config = ServerConfig(git=config.git, http=HttpConfig(admin_token_file=admin))
    watcher = GitWatcher(config, fleet.store, fleet.nudge)
    app = create_app(fleet.store, config, ServerMetrics(), actions=ApiActions(trigger_git=watcher.trigger))
    watcher.start()
    try:
        _wait_for(fleet.nudged)                    # the first poll happens at start
        sha2 = fleet.release({"a.txt": "2\n"})
        with serve_app(app) as url:
            body = b'{"ref": "refs/heads/main"}'
            bad = "sha256=" + hmac.new(b"wrong", body, hashlib.sha256).hexdigest()
            refused = httpx.post(url + "/api/v1/hooks/git", content=body,
                                 headers={"X-Hub-Signature-256": bad}, timeout=5.0)
            assert refused.status_code == 403
            time.sleep(0.3)
            assert not fleet.nudged.is_set()       # the hour-long poll interval has not passed
            good = "sha256=" + hmac.new(HOOK_SECRET, body, hashlib.sha256).hexdigest()
            accepted = httpx.post(url + "/api/v1/hooks/git", content=body,
                                  headers={"X-Hub-Signature-256": good}, timeout=5.0)
            assert accepted.status_code == 202
            _wait_for(fleet.nudged)
        assert fleet.nudges[-1] == (sha2, 2)
    finally:
        watcher.stop()


def test_watcher_needs_a_git_url(fleet: Fleet) -> None:
    with pytest.raises(ServerConfigError, match=r"git\.url"):
        GitWatcher(ServerConfig(), fleet.store, fleet.nudge)


def test_module_exports_are_pinned() -> None:
    from fleet_server import releases  # noqa: PLC0415

    assert sorted(releases.__all__) == ["GitWatcher", "PollOutcome", "ReleaseRecorder", "refusal_reason"]
