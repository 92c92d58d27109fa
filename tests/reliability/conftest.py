"""Markers of the reliability suite."""

from __future__ import annotations

import pytest

__all__ = ["pytest_configure"]


def pytest_configure(config: pytest.Config) -> None:
    """Register ``reliability_long``: a fault case that takes minutes (a separate target CI still runs)."""
    config.addinivalue_line(
        "markers", "reliability_long: a reliability case that takes minutes; run with -m reliability_long")
