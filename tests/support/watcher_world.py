"""A config repository served by `git daemon` on loopback, an operator key and a store: the world of
the Git watcher's tests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nacl.signing import SigningKey

from edge_core.trust.keys import format_verify_key
from fleet_server.config import GitConfig, GitTrust, ServerConfig, StoreConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.releases import GitWatcher
from fleet_server.signing import sign_release
from fleet_server.store import FleetStore, open_store
from tests.support.gitrepo import WorkRepo, make_bare
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
    store: FleetStore
    tmp: Path
    nudges: list[tuple[str, int]] = field(default_factory=list)
    nudged: threading.Event = field(default_factory=threading.Event)

    def config(self, *, poll_interval: float = 60.0, keys: tuple[str, ...] | None = None,
               allowed_signers: Path | None = None) -> ServerConfig:
        trusted = keys if keys is not None else (format_verify_key(self.key.verify_key),)
        hook = self.tmp / "hook.secret"
        hook.write_bytes(HOOK_SECRET)
        return ServerConfig(git=GitConfig(url=self.daemon.url("fleet.git"), branch="main",
                                          poll_interval=poll_interval, webhook_secret_file=hook,
                                          trust=GitTrust(keys=trusted, threshold=1,
                                                         allowed_signers=allowed_signers),
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

    def watcher(self, *, poll_interval: float = 60.0, allowed_signers: Path | None = None) -> GitWatcher:
        return GitWatcher(self.config(poll_interval=poll_interval, allowed_signers=allowed_signers),
                          self.store, self.nudge, metrics=ServerMetrics().releases)


@contextlib.contextmanager
def watcher_fleet(tmp_path: Path, store_config: StoreConfig | None = None) -> Iterator[Fleet]:
    """A bare mirror served by git daemon, a work repository, a new operator key and a store (SQLite
    in ``tmp_path`` unless ``store_config`` names another)."""
    mirrors = tmp_path / "mirrors"
    bare = make_bare(mirrors / "fleet.git")
    work = WorkRepo.create(tmp_path / "work")
    store = open_store(store_config or StoreConfig(path=tmp_path / "fleet.db"))
    try:
        with GitDaemon(mirrors) as daemon:
            yield Fleet(work, bare, daemon, SigningKey.generate(), store, tmp_path)
    finally:
        store.close()
