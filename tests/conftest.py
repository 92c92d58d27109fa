"""Test-wide set-up: a scrubbed environment so that no developer's Git or SSH config leaks in, and
the longest test files first."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_SCRUB_PREFIXES = ("GIT_", "SSH_", "MQTT_", "EDGE_", "FLEET_")


def _weight(item: pytest.Item) -> int:
    """0 for a test that takes minutes, 1 for one marked slow, 2 for the rest."""
    if item.get_closest_marker("reliability_long"):
        return 0
    return 1 if item.get_closest_marker("slow") else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the test files by their slowest test, longest first, each file keeping its own order.

    ``make test`` hands whole files to its workers in this order (``--dist loadfile
    --no-loadscope-reorder``), so the files that take minutes start at once instead of last, when
    the other worker would sit idle waiting for them.
    """
    weight: dict[Path, int] = {}
    for item in items:
        weight[item.path] = min(weight.get(item.path, 2), _weight(item))
    items.sort(key=lambda item: weight[item.path])


@pytest.fixture(autouse=True)
def own_logging() -> Iterator[None]:
    """A command's main() run in the test process (edge-agent, fleetctl, fleet-server) sends the
    process's logs to the captured stderr, which closes with the test: undo that after each test."""
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    yield
    for handler in list(root.handlers):
        if getattr(handler, "_edge_agent", False) and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def scrubbed_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Give every test its own HOME and no inherited GIT_*/SSH_* variables; a fixed git identity."""
    home = tmp_path_factory.mktemp("home")
    for name in list(os.environ):
        if name.startswith(_SCRUB_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test Operator")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "operator@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test Operator")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "operator@example.invalid")
    monkeypatch.setenv("TZ", "UTC")
    return home


# Shared fixtures of the test-support modules, registered once here.
from tests.support.agent_fleet import fleet  # noqa: E402
from tests.support.broker import broker  # noqa: E402
from tests.support.dashboard_site import browser, rollout_site, site  # noqa: E402
from tests.support.mirror import git_daemon, http_mirror, mirror_root  # noqa: E402
from tests.support.plans import state  # noqa: E402
from tests.support.stores import any_store, new_store, postgres_cluster, store_config  # noqa: E402

__all__ = ["any_store", "broker", "browser", "fleet", "git_daemon", "http_mirror", "mirror_root", "new_store",
           "own_logging", "postgres_cluster", "rollout_site", "scrubbed_env", "site", "state", "store_config"]
