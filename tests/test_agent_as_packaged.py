"""The agent with the module set its package ships: dulwich without the compiled accelerators the
package leaves out of its venv (``drop_extensions`` in packaging/build_deb.py), running its own
pure-Python code for tree parsing, pack index search and delta application.

A sync runs in a child process that cannot import those modules, against a ``git daemon`` mirror:
a first release whose similar files the mirror sends as deltas, then an update. The Debian-root
install test runs the installed package the same way against a ``file://`` mirror.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from edge_agent.agent import status
from tests.support.agent_fleet import AgentFleet, bundle
from tests.support.fetch_child import run_child
from tests.support.package_spec import agent_dropped_extensions

FILES = 40


def _release(changed: int | None = None) -> dict[str, str]:
    """A bundle of similar files (so the mirror packs them as deltas); ``changed`` edits one."""
    files = {f"bundles/app/files/f{i:02d}.conf": f"# file {i}\n" + "shared = setting\n" * 60
             + f"value = {i}{'-new' if i == changed else ''}\n" for i in range(FILES)}
    resources = [{"kind": "file", "path": f"/etc/app/f{i:02d}.conf", "source": f"files/f{i:02d}.conf"}
                 for i in range(FILES)]
    return {"fleet.yaml": "description: packaged agent\n", "bundles/app/bundle.yaml": bundle(resources),
            **files}


def _sync_as_packaged(fleet: AgentFleet) -> dict[str, object]:
    got = run_child({"mode": "sync", "config": str(fleet.config_path), "limit_mib": 1024,
                     "without": list(agent_dropped_extensions()),
                     "watch": list(agent_dropped_extensions())})
    assert got["loaded"] == [], got
    return got


def _applied(fleet: AgentFleet, release: dict[str, str]) -> bool:
    return all((fleet.root / "etc/app" / f"f{i:02d}.conf").read_text()
               == release[f"bundles/app/files/f{i:02d}.conf"] for i in range(FILES))


def _delta_objects(cache: Path) -> int:
    """How many objects of the cache's packs are stored as deltas (``git verify-pack -v``)."""
    count = 0
    for idx in sorted(cache.glob("objects/pack/*.idx")):
        out = subprocess.run(["git", "verify-pack", "-v", str(idx)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        count += sum(1 for line in out.splitlines() if len(line.split()) == 7)  # with depth and base
    return count


def test_a_sync_fetches_verifies_and_applies_with_dulwich_pure_python(fleet: AgentFleet) -> None:
    first = _release()
    commit = fleet.publish(first)
    got = _sync_as_packaged(fleet)
    assert got["outcome"] == "applied", got
    assert _applied(fleet, first)
    assert _delta_objects(fleet.state_dir / "repo") > 0  # the fetch resolved deltas in Python
    assert status(fleet.config)["installed"]["commit"] == commit

    update = _release(changed=7)
    commit = fleet.publish(update)
    got = _sync_as_packaged(fleet)
    assert got["outcome"] == "applied", got
    assert _applied(fleet, update)
    assert status(fleet.config)["installed"]["commit"] == commit
