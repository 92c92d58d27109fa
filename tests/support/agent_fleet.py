"""An operator repo, a mirror served by a real `git daemon` and one device: the agent test world."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from nacl.signing import SigningKey

from edge_agent.config import AgentConfig, load_config
from edge_agent.state import StateDB
from edge_core.trust.keys import format_verify_key, generate_signing_key
from fleet_server.signing import sign_release
from tests.support.gitrepo import WorkRepo, make_bare
from tests.support.mirror import GitDaemon

PROFILE = {
    "name": "test-device",
    "description": "a device rooted in a temporary directory",
    "allowed_roots": ["/etc", "/opt", "/srv"],
    "drivers": ["file", "directory", "symlink", "absent", "secret_file", "command", "systemd_unit",
                "sysctl"],
    "systemd_units": ["*"],
    "sysctl_keys": ["*"],
}


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under ``root``: relative path -> (type, mode, content or link target)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


class AgentFleet:
    """One operator repo + bare mirror served by ``git daemon`` + one device's config, root and state."""

    def __init__(self, tmp_path: Path, daemon: GitDaemon, mirror_root: Path, *, mode: str = "enforce",
                 device_id: str = "dev-1", labels: dict[str, str] | None = None) -> None:
        self.tmp = tmp_path
        self.key_file = tmp_path / "operator.key"
        self.key: SigningKey = generate_signing_key(self.key_file)
        self.work = WorkRepo.create(tmp_path / "work")
        self.bare = make_bare(mirror_root / "fleet.git")
        self.daemon = daemon
        self.root = tmp_path / "root"
        for d in ("etc", "opt", "srv"):
            (self.root / d).mkdir(parents=True)
        self.state_dir = tmp_path / "state"
        profiles = tmp_path / "profiles"
        profiles.mkdir()
        (profiles / "test-device.yaml").write_text(yaml.safe_dump(PROFILE))
        self.config_path = tmp_path / "agent.yaml"
        self.write_config(mode=mode, device_id=device_id, labels=labels or {"role": "gateway"})
        self.version = 0

    def write_config(self, **changes: Any) -> AgentConfig:
        data: dict[str, Any] = {
            "device_id": changes.get("device_id", "dev-1"),
            "labels": changes.get("labels", {"role": "gateway"}),
            "profile": "test-device",
            "profile_dirs": ["profiles"],
            "repo": {"url": self.daemon.url("fleet.git"), "timeout": "5s"},
            "trust": {"keys": [format_verify_key(self.key.verify_key)]},
            "mode": changes.get("mode", "enforce"),
            "root": "root",
            "state_dir": "state",
            "backoff": {"base": "100ms", "cap": "1s"},
        }
        self.config_path.write_text(yaml.safe_dump(data))
        self.config = load_config(self.config_path)
        return self.config

    def publish(self, files: Mapping[str, str | bytes], *, remove: tuple[str, ...] = (),
                floor: int | None = None, expires: timedelta = timedelta(days=1),
                now: datetime | None = None, keys: list[SigningKey] | None = None) -> str:
        """Write, sign (next version), commit and push; return the commit sha."""
        for rel in remove:
            self.work.remove(rel)
        self.work.write_files(files)
        self.version += 1
        sign_release(self.work.path, keys or [self.key], expires=expires, now=now or datetime.now(UTC),
                     version=self.version, floor=floor)
        sha = self.work.commit(f"release {self.version}")
        self.work.push(self.bare, force=True)
        return sha

    def push_unsigned(self, files: dict[str, str | bytes]) -> str:
        """Commit and push a change without signing it again (a tampering mirror or operator)."""
        self.work.write_files(files)
        sha = self.work.commit("unsigned change")
        self.work.push(self.bare, force=True)
        return sha

    def db_bytes(self) -> bytes:
        """Every byte of the state database files (main file and WAL)."""
        return b"".join(p.read_bytes() for p in sorted(self.state_dir.glob("state.db*")))

    def outbox(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of every queued report, oldest first."""
        db = StateDB(self.state_dir / "state.db")
        try:
            return [(item.topic, item.payload) for item in db.outbox_peek(100_000)]
        finally:
            db.close()


def bundle(resources: list[dict[str, Any]], health: list[dict[str, Any]] | None = None) -> str:
    """A bundle.yaml for the gateway devices with these resources (and health checks)."""
    doc: dict[str, Any] = {"targets": [{"labels": {"role": "gateway"}}], "resources": resources}
    if health:
        doc["health"] = health
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[AgentFleet]:
    """The one agent test world: a signed operator repo, a `git daemon` mirror, one device in ``tmp_path``."""
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    with GitDaemon(mirrors) as daemon:
        yield AgentFleet(tmp_path, daemon, mirrors)


def base_release(root: Path) -> dict[str, str]:
    """The files of a release that touches every file-ish kind plus one guarded command."""
    return {
        "fleet.yaml": "description: test fleet\n",
        "bundles/app/bundle.yaml": bundle([
            {"kind": "directory", "path": "/opt/app/data", "mode": "0750"},
            {"kind": "file", "id": "app-config", "path": "/etc/app/app.conf", "source": "files/app.conf",
             "mode": "0640"},
            {"kind": "file", "path": "/etc/motd", "content": "managed by edge-fleet\n", "mode": "0644"},
            {"kind": "symlink", "path": "/opt/app/current", "target": "/opt/app/releases/1.0"},
            {"kind": "absent", "path": "/etc/app/legacy.conf"},
            {"kind": "command", "name": "init-marker", "run": ["touch", str(root / "srv" / "marker")],
             "creates": "/srv/marker"},
        ], health=[{"kind": "command", "name": "true-check", "run": ["true"], "timeout": 5}]),
        "bundles/app/files/app.conf": "listen = 8443\nupstream = one\n",
    }
