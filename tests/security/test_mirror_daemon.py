"""A mirror that drips its answer holds a fetch until ``repo.fetch_deadline``; meanwhile the agent
daemon keeps correcting drift, because it fetches holding only the cache's fetch lock and takes
the apply lock only afterwards. Before the fix the whole sync, fetch included, ran under the apply
lock in the loop thread, so drift correction and health reports stopped for as long as the mirror
liked.

Also the premise of the cache's stale-lock cleaner: it removes nothing while a fetch holds the
fetch lock.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml

from edge_agent.agent import apply_lock, sync_once
from edge_agent.config import load_config
from edge_agent.daemon import Daemon
from edge_agent.errors import LockedError
from edge_core.gitlimits import Deadline, FetchLimits, fetch_lock
from edge_core.source import FETCH_LOCK, Source
from tests.support.agent_fleet import AgentFleet, bundle
from tests.support.hostile_git import HostileGitServer
from tests.support.wait import wait_until

CONF = Path("etc/app/app.conf")



def test_drift_is_corrected_while_a_slow_mirror_holds_the_fetch(fleet: AgentFleet) -> None:
    fleet.publish({"bundles/app/bundle.yaml": bundle([
        {"kind": "file", "path": "/etc/app/app.conf", "content": "release = 1\n"}])})
    assert sync_once(fleet.config).outcome == "applied"
    with HostileGitServer(drip=1.0, max_lines=60) as slow:
        data = yaml.safe_load(fleet.config_path.read_text())
        data["repo"].update(url=slow.url(), timeout="5s", fetch_deadline="60s")
        data["intervals"] = {"poll": "1h", "drift": "1s"}
        fleet.config_path.write_text(yaml.safe_dump(data))
        config = load_config(fleet.config_path)
        stop = threading.Event()
        daemon = Daemon(config, stop=stop)
        runner = threading.Thread(target=daemon.run, name="agent", daemon=True)
        runner.start()
        try:
            wait_until(lambda: slow.lines_sent >= 2, "the fetch to start dripping", 10.0)
            (fleet.root / CONF).write_text("tampered\n")
            wait_until(lambda: (fleet.root / CONF).read_text() == "release = 1\n", "a drift correction", 15.0)
            assert daemon.syncs == 0  # the fetch is still running
            assert slow.lines_sent < 60
            taken = False
            for _ in range(50):  # the apply lock is free between drift checks
                try:
                    with apply_lock(config.state_dir):
                        taken = True
                        break
                except LockedError:
                    time.sleep(0.05)
            assert taken
            assert daemon.drift_checks >= 1
        finally:
            stop.set()
            slow.close()
            runner.join(15.0)
    assert not runner.is_alive()


def test_stale_lock_cleaner_leaves_the_locks_of_a_running_fetch(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with Source("git://127.0.0.1:9/fleet.git", "main", cache) as source:
        source.clear_stale_locks()  # creates the cache
        ref_lock = cache / "refs" / "heads" / "main.lock"
        ref_lock.write_text("")
        with fetch_lock(cache / FETCH_LOCK, Deadline(FetchLimits()), wait=False) as held:
            assert held  # as a fetch in another process holds it
            assert source.clear_stale_locks() == []
            assert ref_lock.exists()
        assert source.clear_stale_locks() == ["refs/heads/main.lock"]
        assert not ref_lock.exists()
