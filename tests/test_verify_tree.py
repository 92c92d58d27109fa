"""One verifier, one error: each case runs through the agent, the server's Git watcher and
``fleetctl release verify``, which must refuse (or accept) it with the same class and message.

A case is a config repo committed to a real work repository and pushed to a bare mirror the agent
and the watcher fetch from (``file://``); fleetctl verifies the work tree. The agent's and the
watcher's verifier is observed where they call it (the error class does not travel in a sync
result); their refusal reasons and fleetctl's ``--json`` output carry the message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from nacl.signing import SigningKey

import edge_agent.verification as verification_module
import fleet_server.releases as releases_module
from edge_agent.agent import SyncCache, sync_once
from edge_agent.config import load_config
from edge_agent.state import StateDB
from edge_core.errors import ExpiredError, RollbackError
from edge_core.trust.keys import format_verify_key
from edge_core.trust.manifest import MANIFEST_PATH, root_path
from edge_core.trust.verify import TreeVerdict, TrustRoot, verify_tree
from fleet_server.authoring.manifest import build_root, sign_document
from fleet_server.config import GitConfig, GitTrust, ServerConfig
from fleet_server.fleetctl import main as fleetctl
from fleet_server.releases import GitWatcher
from fleet_server.signing import sign_release
from fleet_server.store import Store
from tests.support.gitrepo import WorkRepo, make_bare

KEYS = [SigningKey(bytes([n]) * 32) for n in (1, 2, 3)]
A, B, C = (format_verify_key(k.verify_key) for k in KEYS)
FILES = {"fleet.yaml": "description: verify-tree cases\n", "notes/readme.txt": "hello\n"}
PROFILE = {"name": "test-device", "allowed_roots": ["/etc"], "drivers": ["file"]}


@dataclass(frozen=True)
class Case:
    """A config repo to commit, the trust the three paths hold, and the one outcome expected."""

    name: str
    build: Callable[[WorkRepo, datetime], None]
    trust: tuple[str, ...] = (A,)
    threshold: int = 1
    floor: int = 0
    error: str | None = None
    message: str | None = None
    trust_version: int = 1
    paths: tuple[str, ...] = ("agent", "watcher", "fleetctl")
    extra: dict[str, Any] = field(default_factory=dict)


def _sign(work: WorkRepo, keys: list[SigningKey], now: datetime, *, version: int = 1,
          expires: timedelta = timedelta(days=1)) -> None:
    sign_release(work.path, keys, expires=expires, now=now, version=version, floor=1)


def _root(work: WorkRepo, version: int, keys: list[str], signers: list[SigningKey]) -> None:
    work.write(root_path(version), sign_document(build_root(keys, threshold=1, version=version), signers))


def _tampered(work: WorkRepo, now: datetime) -> None:
    work.write_files(FILES)
    _sign(work, [KEYS[0]], now)
    work.write("notes/readme.txt", "changed after signing\n")


def _no_manifest(work: WorkRepo, now: datetime) -> None:
    work.write_files(FILES)


def _signed_v3(work: WorkRepo, now: datetime) -> None:
    work.write_files(FILES)
    _sign(work, [KEYS[0]], now, version=3)


def _expired(work: WorkRepo, now: datetime) -> None:
    work.write_files(FILES)
    _sign(work, [KEYS[0]], now - timedelta(days=2), expires=timedelta(days=1))


def _one_signature(work: WorkRepo, now: datetime) -> None:
    work.write_files(FILES)
    _sign(work, [KEYS[0]], now)


def _rotated(work: WorkRepo, now: datetime) -> None:
    """Root 2 moves trust from A to C (signed by both); the release is signed by C alone."""
    work.write_files(FILES)
    _root(work, 2, [C], [KEYS[0], KEYS[2]])
    _sign(work, [KEYS[2]], now)


def _rotation_without_old_keys(work: WorkRepo, now: datetime) -> None:
    work.write_files(FILES)
    _root(work, 2, [C], [KEYS[2]])
    _sign(work, [KEYS[2]], now)


def _revoked(work: WorkRepo, now: datetime) -> None:
    """Root 2 revokes A (keeps B); the release is still signed by A alone."""
    work.write_files(FILES)
    _root(work, 2, [B], [KEYS[0], KEYS[1]])
    _sign(work, [KEYS[0]], now)


CASES = [
    Case("tampered file", _tampered, error="FileHashMismatch",
         message="notes/readme.txt does not match its digest or size in release 1"),
    Case("missing manifest", _no_manifest, error="UntrustedKeyError",
         message=f"the release has no signed manifest at {MANIFEST_PATH}"),
    # The server records every signed release (its floor is 0); a rollback is a device's refusal.
    Case("below floor", _signed_v3, floor=5, error="RollbackError",
         message="release 3 is below the rollback floor 5", paths=("agent", "fleetctl")),
    Case("expired", _expired, error="ExpiredError", message="release 1 expired at "),
    Case("under threshold", _one_signature, trust=(A, B), threshold=2, error="ThresholdError",
         message="release 1 has 1 valid trusted signature(s), 2 required"),
    Case("rotated root", _rotated, trust_version=2),
    Case("rotation not signed by the old keys", _rotation_without_old_keys, error="RootRotationError",
         message="root 2 has 0 valid signature(s) by the current keys, 1 required"),
    Case("revoked key", _revoked, trust=(A, B), error="UntrustedKeyError",
         message="release 1 is not validly signed by any trusted key"),
]


@dataclass(frozen=True)
class Seen:
    """What one path decided: the error's class name and message, or the trust root version."""

    error: str | None
    message: str | None
    trust_version: int | None = None


class Spy:
    """Wraps the real ``verify_tree`` where a path calls it, remembering what it raised."""

    def __init__(self) -> None:
        self.raised: list[Exception] = []

    def __call__(self, *args: Any, **kwargs: Any) -> TreeVerdict:
        try:
            return verify_tree(*args, **kwargs)
        except Exception as exc:
            self.raised.append(exc)
            raise


def _through_agent(tmp: Path, mirror: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> Seen:
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "test-device.yaml").write_text(yaml.safe_dump(PROFILE))
    (tmp / "root" / "etc").mkdir(parents=True)
    config_path = tmp / "agent.yaml"
    config_path.write_text(yaml.safe_dump({
        "device_id": "dev-1", "profile": "test-device", "profile_dirs": ["profiles"],
        "repo": {"url": mirror.as_uri(), "timeout": "5s"},
        "trust": {"keys": list(case.trust), "threshold": case.threshold},
        "root": "root", "state_dir": "state",
    }))
    config = load_config(config_path)
    if case.floor:
        db = StateDB(config.state_dir / "state.db")
        db.raise_floor(case.floor)
        db.close()
    spy = Spy()
    monkeypatch.setattr(verification_module, "verify_tree", spy)
    result = sync_once(config)
    if result.outcome == "refused":
        assert len(spy.raised) == 1
        assert result.reason == str(spy.raised[0])
        return Seen(type(spy.raised[0]).__name__, result.reason)
    assert result.outcome in ("applied", "noop"), result
    db = StateDB(config.state_dir / "state.db")
    try:
        stored = db.trust_root()
    finally:
        db.close()
    return Seen(None, None, 1 if stored is None else int(stored["version"]))


def _through_watcher(tmp: Path, mirror: Path, case: Case, caplog: pytest.LogCaptureFixture) -> Seen:
    config = ServerConfig(git=GitConfig(url=mirror.as_uri(), branch="main",
                                        trust=GitTrust(keys=case.trust, threshold=case.threshold),
                                        cache_dir=tmp / "git-cache"))
    store = Store(tmp / "fleet.db")
    watcher = GitWatcher(config, store, lambda revision, release: None)
    try:
        with caplog.at_level(logging.WARNING, logger=releases_module.__name__):
            outcome = watcher.poll_once()
        trust_version = watcher._trust.version
    finally:
        watcher.stop()
        store.close()
    if outcome.status == "refused":
        refusals = [r for r in caplog.records if r.getMessage().startswith("git watcher: refused")]
        assert len(refusals) == 1
        exc = refusals[0].args[-1]  # type: ignore[index]
        assert isinstance(exc, Exception)
        return Seen(type(exc).__name__, str(exc))
    assert outcome.status == "new", outcome
    return Seen(None, None, trust_version)


def _through_fleetctl(work: WorkRepo, case: Case, capsys: pytest.CaptureFixture[str]) -> Seen:
    argv = ["release", "verify", str(work.path), "--json", "--threshold", str(case.threshold),
            "--floor", str(case.floor)]
    for key in case.trust:
        argv += ["--trust", key]
    code = fleetctl(argv)
    out, err = capsys.readouterr()
    doc = json.loads(out)
    if code == 0:
        return Seen(None, None, int(doc["trust_root_version"]))
    assert code == 1
    assert err == f"fleetctl: {doc['reason']}\n"
    return Seen(str(doc["error"]), str(doc["reason"]))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_case_one_outcome_on_every_path(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    work = WorkRepo.create(tmp_path / "work")
    mirror = make_bare(tmp_path / "mirror.git")
    case.build(work, now)
    work.commit(case.name)
    work.push(mirror)

    seen: dict[str, Seen] = {}
    for path in case.paths:
        where = tmp_path / path
        where.mkdir()
        if path == "agent":
            seen[path] = _through_agent(where, mirror, case, monkeypatch)
        elif path == "watcher":
            seen[path] = _through_watcher(where, mirror, case, caplog)
        else:
            seen[path] = _through_fleetctl(work, case, capsys)

    if case.error is None:
        assert seen == {p: Seen(None, None, case.trust_version) for p in case.paths}
        return
    first = seen[case.paths[0]]
    assert seen == {p: first for p in case.paths}, seen
    assert first.error == case.error
    assert first.message is not None
    assert case.message is not None
    assert first.message.startswith(case.message)


def test_the_daemons_cached_verdict_refuses_with_the_verifiers_own_messages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync that reuses a verified commit (the daemon's cache) checks expiry and the floor again;
    the refusal reads exactly as the verifier's on the same tree."""
    now = datetime.now(UTC)
    work = WorkRepo.create(tmp_path / "work")
    mirror = make_bare(tmp_path / "mirror.git")
    _one_signature(work, now)
    work.commit("release 1")
    work.push(mirror)
    device = tmp_path / "agent"
    device.mkdir()
    _through_agent(device, mirror, Case("ok", _one_signature), monkeypatch)
    config = load_config(device / "agent.yaml")
    cache = SyncCache()
    assert sync_once(config, cache=cache, now=now).outcome in ("applied", "noop")
    assert cache.verified is not None
    tree = {p: (work.path / p).read_bytes() for p in (*FILES, MANIFEST_PATH)}

    late = now + timedelta(days=2)
    expired = sync_once(config, cache=cache, now=late)
    with pytest.raises(ExpiredError) as fresh:
        verify_tree(tree, TrustRoot(frozenset({A}), 1), now=late, floor=0)
    assert (expired.outcome, expired.reason) == ("refused", str(fresh.value))

    db = StateDB(config.state_dir / "state.db")
    db.raise_floor(2)
    db.close()
    below = sync_once(config, cache=cache, now=now)
    with pytest.raises(RollbackError) as fresh_floor:
        verify_tree(tree, TrustRoot(frozenset({A}), 1), now=now, floor=2)
    assert (below.outcome, below.reason) == ("refused", str(fresh_floor.value))
