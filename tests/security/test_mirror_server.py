"""The fleet server's Git watcher fetches through the same code as devices, under the same bounds
from its ``git:`` section: a dripping mirror fails the poll at ``git.fetch_deadline`` (counted and
retried at the next poll) instead of holding the watcher's poll lock for as long as it likes."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

from edge_core.trust.keys import format_verify_key
from fleet_server.config import GitConfig, GitTrust, ServerConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.releases import GitWatcher
from fleet_server.store import Store
from tests.support.hostile_git import HostileGitServer


def test_watcher_poll_against_a_dripping_mirror_ends_at_the_deadline(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    key = format_verify_key(SigningKey.generate().verify_key)
    try:
        with HostileGitServer(drip=1.0, max_lines=60) as slow:
            config = ServerConfig(git=GitConfig(url=slow.url(), trust=GitTrust(keys=(key,)),
                                                cache_dir=tmp_path / "git-cache", fetch_deadline=3.0))
            watcher = GitWatcher(config, store, lambda revision, release: None,
                                 metrics=ServerMetrics().releases)
            try:
                outcome = watcher.poll_once()
            finally:
                watcher.stop()
            sent = slow.lines_sent
        assert outcome.status == "fetch_failed"
        assert outcome.reason is not None
        assert outcome.reason.startswith("fetch exceeds git.fetch_deadline (3s)")
        assert sent < 60
        assert watcher.metrics.registry.get_sample_value("fleet_git_polls_total", {"result": "error"}) == 1
    finally:
        store.close()
