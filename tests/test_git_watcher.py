"""The Git watcher against a real repository served by `git daemon` on loopback, and a real store."""

from __future__ import annotations

import hashlib
import hmac
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

from edge_core.errors import SignatureError
from edge_core.trust.keys import format_verify_key
from edge_core.trust.sshsig import parse_allowed_signers, verify_commit
from fleet_server.api import ApiActions, create_app
from fleet_server.baseline import FleetBaseline
from fleet_server.cli.history import format_releases
from fleet_server.config import HttpConfig, ServerConfig, StoreConfig, parse_server_config
from fleet_server.errors import ServerConfigError
from fleet_server.main import LeaderDuties
from fleet_server.metrics import ServerMetrics
from fleet_server.releases import GitWatcher, PollOutcome
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import Store
from tests.support.api_server import serve_app
from tests.support.gitrepo import WorkRepo, git
from tests.support.watcher_world import HOOK_SECRET, WAIT_S, Fleet, watcher_fleet


@pytest.fixture
def fleet(tmp_path: Path, store_config: StoreConfig) -> Iterator[Fleet]:
    with watcher_fleet(tmp_path, store_config) as world:
        yield world


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


def test_a_webhook_on_a_follower_makes_the_leaders_watcher_poll_through_the_store(fleet: Fleet) -> None:
    fleet.release({"a.txt": "1\n"})
    config = ServerConfig(git=fleet.config(poll_interval=3600.0).git)

    def duties() -> LeaderDuties:  # one replica's leader duties, on the store the replicas share
        runner = RolloutRunner(fleet.store, lambda *args, **kwargs: None)
        baseline = FleetBaseline(fleet.store, lambda *args: None)
        return LeaderDuties(config, fleet.store, runner, baseline=baseline, nudge=fleet.nudge,
                            metrics=ServerMetrics())

    leader, follower = duties(), duties()
    follower_app = create_app(fleet.store, config, ServerMetrics(),
                              actions=ApiActions(trigger_git=follower.trigger_git))
    leader.start()
    try:
        _wait_for(fleet.nudged)                    # the leader's first poll
        assert fleet.store.git_poll_requests() == 0
        sha2 = fleet.release({"a.txt": "2\n"})
        time.sleep(1.5)
        assert not fleet.nudged.is_set()           # the hour-long poll interval has not passed
        body = b'{"ref": "refs/heads/main"}'
        signature = "sha256=" + hmac.new(HOOK_SECRET, body, hashlib.sha256).hexdigest()
        with serve_app(follower_app) as url:
            accepted = httpx.post(url + "/api/v1/hooks/git", content=body,
                                  headers={"X-Hub-Signature-256": signature}, timeout=5.0)
        assert accepted.status_code == 202
        assert fleet.store.git_poll_requests() == 1
        _wait_for(fleet.nudged)                    # the leader saw the request in the store
        assert fleet.nudges[-1] == (sha2, 2)
        assert fleet.store.audit(action="git.poll")[0]["reason"] == "webhook"
    finally:
        leader.stop()


def test_watcher_needs_a_git_url(fleet: Fleet) -> None:
    with pytest.raises(ServerConfigError, match=r"git\.url"):
        GitWatcher(ServerConfig(), fleet.store, fleet.nudge)


def test_module_exports_are_pinned() -> None:
    from fleet_server import releases  # noqa: PLC0415

    assert sorted(releases.__all__) == ["GitWatcher", "PollOutcome", "ReleaseRecorder", "refusal_reason"]


# -- the commit-signature policy devices with trust.allowed_signers apply ---------------------------


def _ssh_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path.with_name(path.name + ".pub")


def _sign_commits_with(work: WorkRepo, public_key: Path | None) -> None:
    if public_key is None:
        git("config", "commit.gpgsign", "false", cwd=work.path)
        return
    git("config", "gpg.format", "ssh", cwd=work.path)
    git("config", "user.signingkey", str(public_key), cwd=work.path)
    git("config", "commit.gpgsign", "true", cwd=work.path)


def _device_reason(work: WorkRepo, sha: str, allowed: Path) -> str:
    """The one-line reason a device with ``trust.allowed_signers`` refuses ``sha`` with."""
    raw = subprocess.run(["git", "cat-file", "commit", sha], cwd=work.path, capture_output=True,
                         check=True, timeout=30).stdout
    with pytest.raises(SignatureError) as info:
        verify_commit(raw, parse_allowed_signers(allowed.read_text()))
    return str(info.value)


def _refusals(store: Store) -> list[tuple[str, str, str]]:
    return [(e["target"], e["detail"]["code"], e["reason"]) for e in store.audit(action="release_refused")]


def test_head_commit_must_carry_an_allowed_ssh_signature(fleet: Fleet, tmp_path: Path) -> None:
    alice, mallory = _ssh_key(tmp_path / "alice"), _ssh_key(tmp_path / "mallory")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'alice@example.invalid namespaces="git" {alice.read_text().strip()}\n')
    watcher = fleet.watcher(allowed_signers=allowed)
    try:
        _sign_commits_with(fleet.work, alice)
        good = fleet.release({"a.txt": "1\n"})
        assert watcher.poll_once() == PollOutcome("new", commit=good, release=1)

        _sign_commits_with(fleet.work, mallory)          # a valid release, signed by the wrong SSH key
        by_mallory = fleet.release({"a.txt": "2\n"})
        assert watcher.poll_once() == PollOutcome("refused", commit=by_mallory, reason="commit_signature")
        _sign_commits_with(fleet.work, None)             # a valid release in an unsigned commit
        unsigned = fleet.release({"a.txt": "3\n"})
        assert watcher.poll_once() == PollOutcome("refused", commit=unsigned, reason="commit_signature")

        assert _refused(watcher, "commit_signature") == 2
        assert [r["version"] for r in fleet.store.releases()] == [1]
        assert fleet.nudges == [(good, 1)]
        assert _refusals(fleet.store) == [
            (unsigned, "commit_signature", _device_reason(fleet.work, unsigned, allowed)),
            (by_mallory, "commit_signature", _device_reason(fleet.work, by_mallory, allowed))]
        assert _refusals(fleet.store)[0][2] == "commit is not signed"
    finally:
        watcher.stop()


def test_allowed_signers_is_a_known_server_config_key(tmp_path: Path) -> None:
    key = format_verify_key(SigningKey.generate().verify_key)
    config = parse_server_config({"git": {"url": "git://127.0.0.1/fleet.git", "cache_dir": "cache",
                                          "trust": {"keys": [key], "allowed_signers": "signers"}}}, tmp_path)
    assert config.git.trust.allowed_signers == tmp_path / "signers"


def test_unreadable_allowed_signers_is_a_one_line_config_error(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match=r"^git\.trust\.allowed_signers: cannot read "):
        fleet.watcher(allowed_signers=tmp_path / "missing")


# -- a mirror going backwards ----------------------------------------------------------------------


def _push_replay_of(fleet: Fleet, old: str) -> str:
    """Commit ``old``'s tree on top of the branch (a new commit carrying an old release), push it to
    the mirror and return the new commit."""
    work = fleet.work
    tree = git("rev-parse", f"{old}^{{tree}}", cwd=work.path).strip()
    sha = git("commit-tree", tree, "-p", "HEAD", "-m", "replay", cwd=work.path).strip()
    git("reset", "--quiet", "--hard", sha, cwd=work.path)
    work.push(fleet.bare)
    return sha


def test_force_pushed_older_release_is_refused_as_rollback(fleet: Fleet,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    first = fleet.release({"a.txt": "1\n"})
    fleet.release({"a.txt": "2\n"})
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once().status == "new"
        git("reset", "--quiet", "--hard", first, cwd=fleet.work.path)
        fleet.work.push(fleet.bare, force=True)
        with caplog.at_level(logging.INFO, logger="fleet_server.releases"):
            assert watcher.poll_once() == PollOutcome("refused", commit=first, release=1, reason="rollback")
        assert [r.levelno for r in caplog.records if first in r.getMessage()] == [logging.WARNING]
        assert _refused(watcher, "rollback") == 1
        [(commit, code, reason)] = _refusals(fleet.store)
        assert (commit, code) == (first, "rollback")
        assert "older than release 2" in reason
        assert watcher.poll_once() == PollOutcome("unchanged", commit=first)
        assert _refused(watcher, "rollback") == 1
    finally:
        watcher.stop()


def test_new_commit_carrying_an_older_release_is_refused_as_rollback(fleet: Fleet) -> None:
    first = fleet.release({"a.txt": "1\n"})
    fleet.release({"a.txt": "2\n"})
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once().status == "new"
        replay = _push_replay_of(fleet, first)
        assert watcher.poll_once() == PollOutcome("refused", commit=replay, release=1, reason="rollback")
        assert _refused(watcher, "rollback") == 1
    finally:
        watcher.stop()


def test_newest_release_at_another_commit_is_refused_as_replayed_tree(fleet: Fleet) -> None:
    first = fleet.release({"a.txt": "1\n"})
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once().status == "new"
        replay = _push_replay_of(fleet, first)
        assert watcher.poll_once() == PollOutcome("refused", commit=replay, release=1, reason="replayed_tree")
        assert _refused(watcher, "replayed_tree") == 1
        assert fleet.nudges == [(first, 1)]
        [(commit, code, reason)] = _refusals(fleet.store)
        assert (commit, code) == (replay, "replayed_tree")
        assert first in reason
    finally:
        watcher.stop()


def test_refused_heads_are_listed_by_the_api_and_fleetctl(fleet: Fleet) -> None:
    first = fleet.release({"a.txt": "1\n"})
    watcher = fleet.watcher()
    try:
        assert watcher.poll_once().status == "new"
        replay = _push_replay_of(fleet, first)
        assert watcher.poll_once().reason == "replayed_tree"
    finally:
        watcher.stop()
    admin = fleet.tmp / "admin.token"
    admin.write_text("admin-token\n")
    config = ServerConfig(http=HttpConfig(admin_token_file=admin))
    with serve_app(create_app(fleet.store, config, ServerMetrics(), actions=ApiActions())) as url:
        answer = httpx.get(url + "/api/v1/releases", headers={"Authorization": "Bearer admin-token"},
                           timeout=5.0).json()
    [listed] = answer["refused"]
    assert (listed["commit"], listed["code"], listed["release"]) == (replay, "replayed_tree", 1)
    text = format_releases(answer["releases"], 50, answer["refused"])
    assert f"{replay[:12]}  1        replayed_tree" in text
    assert text.rstrip().endswith("1 refused head commit(s): the mirror's branch head was not recorded")
