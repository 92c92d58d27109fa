"""Install the freshly built packages into a throwaway Debian 12 root with dpkg and use them.

Runs packaging/test-install.sh: debootstrap --variant=minbase into a cached directory (plus
python3 installed with apt inside it, once), a fresh copy per run, ``dpkg -i`` with the real
maintainer scripts, the optimised byte code of every module the agent loads and the dpkg trigger
that writes it again, ``edge-agent --version``, ``init`` and ``sync --once`` against a signed
release on a file:// mirror inside the root, then ``dpkg -r`` (keys and state kept) and ``dpkg -P``
(keys and state gone), and the same for fleet-server. Needs root; about 40 s with a warm cache
(package build included), a minute more the first time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.debs import PACKAGING, built_debs

REPO = Path(__file__).resolve().parent.parent.parent

pytestmark = [
    pytest.mark.chroot,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, chroot and dpkg -i need root"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("chroot") is None,
                       reason="needs dpkg-deb and chroot"),
    pytest.mark.skipif(shutil.which("debootstrap") is None and shutil.which("apt-get") is None,
                       reason="needs debootstrap (or apt-get to install it)"),
]


@pytest.mark.timeout(1200)
def test_packages_install_run_remove_and_purge_in_a_debian_root(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    dist = {deb.parent for deb in built_debs(tmp_path_factory).values()}.pop()
    env = dict(os.environ)
    env.setdefault("EDGE_FLEET_FLEETCTL", f"{sys.executable} -m fleet_server.fleetctl")
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(["bash", str(PACKAGING / "test-install.sh"), str(dist)], capture_output=True,
                          text=True, timeout=1100, env=env, check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "test-install: PASSED" in proc.stdout
