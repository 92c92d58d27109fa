"""Registers the ``chroot`` marker (the run uses --strict-markers)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chroot: installs the .deb packages into a debootstrapped Debian root (root only, slow)")
