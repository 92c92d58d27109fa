"""A whole sync driven through the pipeline with an in-memory source: no git daemon.

The tree is signed with the real signing code, the state database is real SQLite in tmp, the
drivers write real files under a tmp root. Also the rule of :mod:`edge_agent.repeats`: a failure
repeated for the same commit is reported once and counted, and a release that failed its health
check is held until a new commit, a new assignment of it, or ``--want``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from nacl.signing import SigningKey

import edge_agent.engine.plan as plan_module
import edge_agent.planning as planning_module
from edge_agent import repeats
from edge_agent.agent import set_assigned_revision, sync_in
from edge_agent.config import AgentConfig, load_config
from edge_agent.results import SyncResult
from edge_agent.runtime import Runtime, open_runtime
from edge_agent.state import StateDB
from edge_core import messages
from edge_core.errors import FetchError, MessageError
from edge_core.trust.keys import format_verify_key
from fleet_server.signing import sign_release

PROFILE = {
    "name": "test-device",
    "allowed_roots": ["/etc", "/srv"],
    "drivers": ["file", "directory", "command"],
}
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class _Fetched:
    commit: str


class MemorySource:
    """Commits held in memory: sha -> tree; ``head`` is what a fetch of the branch returns."""

    def __init__(self) -> None:
        self.trees: dict[str, dict[str, bytes]] = {}
        self.head: str | None = None
        self.fetches = 0

    def add(self, tree: dict[str, bytes]) -> str:
        sha = f"{len(self.trees) + 1:040x}"
        self.trees[sha] = tree
        self.head = sha
        return sha

    def fetch(self, want: str | None = None) -> _Fetched:
        self.fetches += 1
        sha = want or self.head
        if sha is None or sha not in self.trees:
            raise FetchError(f"no such revision {want}")
        return _Fetched(sha)

    def read_tree(self, commit: str) -> Mapping[str, bytes]:
        return dict(self.trees[commit])

    def commit_raw(self, commit: str) -> bytes:
        raise FetchError("in-memory commits carry no signature")

    def clear_stale_locks(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class Device:
    """An operator repo signed with a real key, one device (config, root, state) and its source."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = SigningKey.generate()
        self.repo = tmp / "repo"
        self.repo.mkdir()
        self.root = tmp / "root"
        for d in ("etc", "srv"):
            (self.root / d).mkdir(parents=True)
        (tmp / "profiles").mkdir()
        (tmp / "profiles" / "test-device.yaml").write_text(yaml.safe_dump(PROFILE))
        path = tmp / "agent.yaml"
        path.write_text(yaml.safe_dump({
            "device_id": "dev-1", "labels": {"role": "gateway"}, "profile": "test-device",
            "profile_dirs": ["profiles"], "repo": {"url": (tmp / "unused.git").as_uri()},
            "trust": {"keys": [format_verify_key(self.key.verify_key)]},
            "root": "root", "state_dir": "state", "backoff": {"base": "10s", "cap": "80s"},
        }))
        self.config: AgentConfig = load_config(path)
        self.source = MemorySource()
        self.version = 0

    def publish(self, resources: list[dict[str, Any]], health: list[dict[str, Any]] | None = None) -> str:
        """Sign a release with these resources (the next version) and make it the head."""
        doc: dict[str, Any] = {"targets": [{"labels": {"role": "gateway"}}], "resources": resources}
        if health:
            doc["health"] = health
        (self.repo / "bundles" / "app").mkdir(parents=True, exist_ok=True)
        (self.repo / "bundles" / "app" / "bundle.yaml").write_text(yaml.safe_dump(doc))
        (self.repo / "fleet.yaml").write_text("description: test fleet\n")
        self.version += 1
        sign_release(self.repo, [self.key], expires=timedelta(days=30), now=NOW, version=self.version)
        files = sorted(p for p in self.repo.rglob("*") if p.is_file())
        tree = {str(p.relative_to(self.repo)): p.read_bytes() for p in files}
        return self.source.add(tree)

    def runtime(self) -> Runtime:
        return open_runtime(self.config, source=self.source, clock=lambda: NOW)

    def sync(self, *, want: str | None = None, at: datetime = NOW) -> SyncResult:
        rt = self.runtime()
        try:
            return sync_in(rt, want=want, now=at)
        finally:
            rt.close()

    def outbox(self, kind: str) -> list[dict[str, Any]]:
        db = StateDB(self.config.state_dir / "state.db")
        try:
            items = db.outbox_peek(10_000)
        finally:
            db.close()
        return [json.loads(i.payload) for i in items if i.topic.endswith("/" + kind)]

    def events(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.outbox("events") if m["type"] == type_]


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


MOTD = {"kind": "file", "path": "/etc/motd", "content": "hello\n", "mode": "0644"}
FAILING_CHECK = [{"kind": "command", "name": "always-fails", "run": ["false"], "timeout": 5}]


def test_whole_sync_from_an_in_memory_source(device: Device) -> None:
    commit = device.publish([MOTD, {"kind": "directory", "path": "/srv/data", "mode": "0750"}])
    result = device.sync()
    assert (result.outcome, result.version, result.commit) == ("applied", 1, commit)
    assert (device.root / "etc" / "motd").read_text() == "hello\n"
    assert (device.root / "srv" / "data").is_dir()
    assert [e["detail"]["outcome"] for e in device.events("sync_succeeded")] == ["applied"]
    status = device.outbox("status")[-1]
    messages.validate("status", status)
    assert status["sync_state"] == "in_sync"
    assert "repeat_count" not in status
    assert device.sync().outcome == "noop"


def test_drivers_are_probed_once_per_sync(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[set[str]] = []
    real = planning_module.probe_kinds

    def counting(kinds: Any, ctx: Any) -> dict[str, str]:
        calls.append(set(kinds))
        return real(kinds, ctx)

    monkeypatch.setattr(planning_module, "probe_kinds", counting)
    monkeypatch.setattr(plan_module, "probe_kinds", counting)
    device.publish([MOTD])
    assert device.sync().outcome == "applied"
    assert calls == [{"file"}]


def test_a_refusal_for_the_same_commit_is_reported_once_then_counted(device: Device) -> None:
    commit = device.publish([MOTD])
    tree = dict(device.source.trees[commit])
    tree["bundles/app/bundle.yaml"] += b"# tampered\n"
    bad = device.source.add(tree)
    results = [device.sync(at=NOW + timedelta(minutes=5 * i)) for i in range(3)]
    assert [r.outcome for r in results] == ["refused"] * 3
    assert [r.repeat_count for r in results] == [1, 2, 3]
    refused = device.events("sync_refused")
    assert len(refused) == 1
    assert refused[0]["commit"] == bad
    status = device.outbox("status")[-1]
    assert status["repeat_count"] == 3
    assert status["last_seen"] == messages.format_ts(NOW + timedelta(minutes=10))
    assert messages.decode("status", messages.encode(status), topic_device="dev-1")["repeat_count"] == 3
    # a good release clears the count
    device.publish([MOTD])
    assert device.sync().outcome == "applied"
    assert "repeat_count" not in device.outbox("status")[-1]


def test_a_release_that_failed_its_health_check_is_not_applied_again(device: Device) -> None:
    commit = device.publish([MOTD], health=FAILING_CHECK)
    first = device.sync()
    assert first.outcome == "rolled_back"
    assert not first.held
    second = device.sync(at=NOW + timedelta(hours=1))
    assert (second.outcome, second.held, second.repeat_count) == ("rolled_back", True, 2)
    assert len(device.events("sync_started")) == 1, "the held release was applied again"
    assert len(device.events("sync_rolled_back")) == 1
    assert not (device.root / "etc" / "motd").exists()
    # the operator asks for it: applied (and rolled back) again
    again = device.sync(want=commit)
    assert again.outcome == "rolled_back"
    assert not again.held
    assert len(device.events("sync_started")) == 2
    # a new assignment of the same commit releases the hold once
    assert device.sync().held
    set_assigned_revision(device.config, commit)
    assert not device.sync().held
    assert len(device.events("sync_started")) == 3
    assert device.sync().held
    # a new commit is applied
    device.publish([MOTD])
    set_assigned_revision(device.config, None)
    assert device.sync().outcome == "applied"


def test_a_failed_apply_is_retried_after_a_doubling_delay(device: Device) -> None:
    device.config.state_dir.mkdir(mode=0o700)
    db = StateDB(device.config.state_dir / "state.db")
    try:
        fail = SyncResult("failed", 3, "a" * 40, reason="undo failed", step="apply")
        first = repeats.note(db, fail, NOW, base=10, cap=80)
        assert first is not None
        assert first.retry_at == NOW.timestamp() + 10
        assert repeats.held(db, "a" * 40, "head", NOW + timedelta(seconds=9)) is not None
        assert repeats.held(db, "a" * 40, "head", NOW + timedelta(seconds=10)) is None
        assert repeats.held(db, "a" * 40, "local", NOW) is None
        delays = []
        at = NOW + timedelta(seconds=10)
        for _ in range(5):
            rec = repeats.note(db, fail, at, base=10, cap=80)
            assert rec is not None
            assert rec.retry_at is not None
            delays.append(rec.retry_at - at.timestamp())
        assert delays == [20, 40, 80, 80, 80]
        assert repeats.note(db, SyncResult("applied", 3, "a" * 40), NOW, base=10, cap=80) is None
        assert repeats.load(db) is None
    finally:
        db.close()


@pytest.mark.parametrize(("field", "value"), [("repeat_count", 0), ("repeat_count", "2"),
                                             ("repeat_count", True), ("last_seen", "yesterday"),
                                             ("last_seen", 5)])
def test_the_status_refuses_a_bad_repeat_field(field: str, value: Any) -> None:
    msg = messages.status_message("dev-1", commit=None, release=None, sync_state="refused",
                                  drift={"count": 0}, paused=False, ts=NOW, repeat_count=2, last_seen=NOW)
    msg[field] = value
    with pytest.raises(MessageError):
        messages.decode("status", messages.encode(msg), topic_device="dev-1")


def test_a_release_whose_change_failed_is_tried_again(device: Device) -> None:
    device.publish([MOTD, {"kind": "command", "name": "boom", "run": ["false"]}])
    first = device.sync()
    assert first.outcome == "rolled_back"
    assert not first.health_failed
    second = device.sync()
    assert (second.outcome, second.held, second.repeat_count) == ("rolled_back", False, 2)
    assert len(device.events("sync_started")) == 2
    assert len(device.events("sync_rolled_back")) == 1
