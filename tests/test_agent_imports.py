"""What the daemon loads before its first sync, and what a sync of a release of files loads: the
code a sync does not need stays unloaded until something needs it (the daemon's memory budget is
40 MB, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Loaded only by what needs them: another resource kind, a secret, SSH-signed commits, a bundle
# file, a preflight, a drift check, a network mirror; psutil not at all.
DEFERRED = (
    "edge_agent.drivers.directory", "edge_agent.drivers.symlink", "edge_agent.drivers.absent",
    "edge_agent.drivers.secret_file", "edge_agent.drivers.systemd", "edge_agent.drivers.sysctl",
    "edge_agent.drivers.command", "edge_core.trust.sealed", "edge_agent.identity", "edge_core.trust.sshsig",
    "edge_core.gitbundle", "edge_agent.preflight", "edge_agent.engine.drift", "edge_core.gitclients",
    "dulwich.client", "psutil",
)


def _loaded(code: str) -> set[str]:
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_daemon_starts_without_the_code_a_sync_does_not_need() -> None:
    loaded = _loaded("import edge_agent.cli, edge_agent.daemon")
    assert "edge_agent.sync" in loaded
    assert not loaded & set(DEFERRED), sorted(loaded & set(DEFERRED))
    assert "edge_agent.drivers.file" not in loaded


def test_a_driver_module_is_loaded_with_the_first_lookup_of_its_kind() -> None:
    loaded = _loaded(
        "from edge_agent.drivers import REGISTRY\n"
        "REGISTRY['systemd_unit']\n"
        "import edge_agent.agent, edge_agent.daemon\n"
    )
    assert {"edge_agent.drivers.systemd", "edge_agent.drivers.file"} <= loaded
    assert "edge_agent.drivers.sysctl" not in loaded
