"""A mirror alone can never move a device backwards: monotonic releases, with real agents.

The mirror is the untrusted repository: it can point its branch at any older commit the operator
once signed. Before the monotonic rule a device applied such a replay as long as it was at or above
the rollback floor. Now it is refused (``sync_refused``, the device unchanged); going back is an
explicit per-device assignment of the fleet server, still bounded by the signed floor.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from edge_agent.agent import set_assigned_revision, status, sync_once
from edge_agent.config import load_config
from edge_agent.daemon import Daemon
from edge_agent.selection import Baseline, set_fleet_baseline
from edge_core import messages as m
from tests.support.agent_fleet import AgentFleet, snapshot
from tests.support.broker import Mosquitto, publish
from tests.support.gitrepo import DEFAULT_BRANCH, git

pytestmark = pytest.mark.timeout(90)

OLDER = "release 1 is older than the installed release 2 and was not assigned by the fleet server"


def release(version: int) -> dict[str, str | bytes]:
    return {
        "fleet.yaml": "description: replay test fleet\n",
        "bundles/app/bundle.yaml": yaml.safe_dump({
            "targets": [{"labels": {"role": "gateway"}}],
            "resources": [{"kind": "file", "path": "/etc/app/release", "content": f"{version}\n",
                           "mode": "0644"}],
        }, sort_keys=False),
    }


def replay(fleet: AgentFleet, commit: str) -> None:
    """Point the mirror's branch at an older signed commit (what a hostile mirror can do)."""
    git("push", "--quiet", "--force", str(fleet.bare), f"{commit}:refs/heads/{DEFAULT_BRANCH}",
        cwd=fleet.work.path)


def installed(fleet: AgentFleet) -> int | None:
    info = status(fleet.config)["installed"]
    return None if info is None else int(info["version"])


def test_a_mirror_replay_of_an_older_signed_release_is_refused(fleet: AgentFleet) -> None:
    v1 = fleet.publish(release(1))
    fleet.publish(release(2))
    assert sync_once(fleet.config).outcome == "applied"
    before = snapshot(fleet.root)
    replay(fleet, v1)
    result = sync_once(fleet.config)
    assert (result.outcome, result.version, result.commit) == ("refused", 1, v1), result
    assert result.reason == OLDER
    assert snapshot(fleet.root) == before
    assert installed(fleet) == 2
    events = [json.loads(p) for t, p in fleet.outbox() if t == "fleet/v1/dev-1/events"]
    assert any(e["type"] == "sync_refused" and e["reason"] == OLDER for e in events)


def test_an_assigned_rollback_to_the_same_release_is_accepted_above_the_floor(fleet: AgentFleet) -> None:
    v1 = fleet.publish(release(1))
    v2 = fleet.publish(release(2))
    assert sync_once(fleet.config).outcome == "applied"
    replay(fleet, v1)
    assert sync_once(fleet.config).outcome == "refused"
    set_assigned_revision(fleet.config, v1)  # the fleet server's retained desired, as the daemon stores it
    back = sync_once(fleet.config)
    assert (back.outcome, back.version) == ("applied", 1), back
    assert (fleet.root / "etc/app/release").read_text() == "1\n"
    # the signed floor still bounds assignments: release 3 retires everything below 2
    set_assigned_revision(fleet.config, None)
    replay(fleet, v2)
    fleet.publish(release(3), floor=2)
    assert sync_once(fleet.config).version == 3
    set_assigned_revision(fleet.config, v1)
    below = sync_once(fleet.config)
    assert below.outcome == "refused"
    assert "floor" in (below.reason or "")
    assert installed(fleet) == 3


def test_a_baseline_that_lies_about_its_release_cannot_move_a_device_back(fleet: AgentFleet) -> None:
    v1 = fleet.publish(release(1))
    fleet.publish(release(2))
    assert sync_once(fleet.config).outcome == "applied"
    # the baseline claims release 5 but names the commit of signed release 1: the signed version wins
    set_fleet_baseline(fleet.config, Baseline(revision=v1, release=5))
    result = sync_once(fleet.config)
    assert (result.outcome, result.version, result.reason) == ("refused", 1, OLDER), result
    assert installed(fleet) == 2


class Running:
    """One real daemon with an MQTT link, in a thread."""

    def __init__(self, fleet: AgentFleet, port: int) -> None:
        data = yaml.safe_load(fleet.config_path.read_text())
        data["mqtt"] = {"host": "127.0.0.1", "port": port, "keepalive": 5}
        data["intervals"] = {"poll": "1s", "drift": "1h", "health": "1h"}
        fleet.config_path.write_text(yaml.safe_dump(data))
        self.config = load_config(fleet.config_path)
        self.stop_event = threading.Event()
        self.daemon = Daemon(self.config, stop=self.stop_event)
        self.thread = threading.Thread(target=self.daemon.run, name="agent", daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_a_running_agent_goes_back_only_by_its_assignment(fleet: AgentFleet, tmp_path: Path) -> None:
    v1 = fleet.publish(release(1))
    fleet.publish(release(2))
    with Mosquitto(tmp_path / "broker") as broker, Running(fleet, broker.port) as agent:
        wait(lambda: (fleet.root / "etc/app/release").exists()
             and (fleet.root / "etc/app/release").read_text() == "2\n", "release 2 from the head")
        # an older fleet baseline does not move the device back, nor does the mirror
        baseline = m.encode(m.baseline_message(revision=v1, release=1, ts=time.time()))
        assert publish(broker.port, "fleet/v1/_broadcast/baseline", baseline, retain=True).returncode == 0
        replay(fleet, v1)
        syncs = agent.daemon.syncs
        wait(lambda: agent.daemon.syncs >= syncs + 3, "three more polls")
        assert (fleet.root / "etc/app/release").read_text() == "2\n"
        # the fleet server's assignment does
        desired = m.encode(m.desired_message("dev-1", revision=v1, release=1, rollout_id="r-1",
                                             ts=time.time()))
        assert publish(broker.port, "fleet/v1/dev-1/desired", desired, retain=True).returncode == 0
        wait(lambda: (fleet.root / "etc/app/release").read_text() == "1\n", "the assigned rollback")
