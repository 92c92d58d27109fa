"""The two .deb packages, built once per test run and shared by the test files that need them.

Building both packages takes most of a minute; the package tests and the Debian-root install test
each need the same two files. The first test process to ask builds them under a lock in the run's
shared temporary directory (the parent of every xdist worker's own), the others wait and reuse them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.package_spec import PACKAGING

__all__ = ["PACKAGING", "built_debs"]

NAMES = {"edge-agent", "fleet-server"}


def _shared_dir(factory: pytest.TempPathFactory) -> Path:
    """A directory this test run's processes share: the parent of an xdist worker's base temp,
    else the base temp itself (the parent is shared by every run then, not only this one)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_debs(factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build ``edge-agent`` and ``fleet-server`` .debs once for this run; return name -> .deb path."""
    shared = _shared_dir(factory) / "debs"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        listing = shared / "built.txt"
        if not listing.exists():
            argv = [sys.executable, str(PACKAGING / "build_deb.py"), "--out", str(shared / "dist"),
                    "--build-dir", str(shared / "build")]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
            assert proc.returncode == 0, f"build_deb.py failed: {proc.stderr}{proc.stdout}"
            listing.write_text(proc.stdout, encoding="utf-8")
        lines = listing.read_text(encoding="utf-8").split()
    found = {Path(line).name.split("_")[0]: Path(line) for line in lines}
    assert set(found) == NAMES, found
    return found

