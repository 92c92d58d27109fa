"""Drift checks and health reports of the daemon take the installed release from its sync cache
(no second read and parse of the release) while the cache holds the installed commit, and read
the repository cache again otherwise."""

from __future__ import annotations

import pytest

from edge_agent.agent import SyncCache, check_drift, report_health, sync_once
from edge_core.source import Source
from tests.support.agent_fleet import AgentFleet, base_release


def _count_tree_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    original = Source.read_tree

    def counting(self: Source, commit: str, **kwargs: int) -> dict[str, bytes]:
        reads.append(commit)
        return original(self, commit, **kwargs)

    monkeypatch.setattr(Source, "read_tree", counting)
    return reads


def test_drift_and_health_use_the_cached_release(fleet: AgentFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SyncCache()
    commit = fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config, cache=cache).outcome == "applied"
    reads = _count_tree_reads(monkeypatch)

    (fleet.root / "etc/motd").write_text("hand edit\n")
    report = check_drift(fleet.config, cache=cache)
    assert [f.resource_id for f in report.findings] == ["file:/etc/motd"]
    assert report.corrected
    assert (fleet.root / "etc/motd").read_text() == "managed by edge-fleet\n"
    assert [(r.name, r.ok) for r in report_health(fleet.config, cache=cache)] == [("true-check", True)]
    assert reads == []

    assert check_drift(fleet.config).findings == ()  # no cache: the release is read again
    assert reads == [commit]


def test_a_cache_of_another_commit_is_not_used(fleet: AgentFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SyncCache()
    fleet.publish(base_release(fleet.root))
    assert sync_once(fleet.config, cache=cache).outcome == "applied"
    second = fleet.publish({"bundles/app/files/app.conf": "listen = 9\n"})
    assert sync_once(fleet.config).outcome == "applied"  # installed behind the cache's back
    reads = _count_tree_reads(monkeypatch)

    (fleet.root / "etc/app/app.conf").write_text("listen = 1\n")
    report = check_drift(fleet.config, cache=cache)
    assert reads == [second]
    assert report.corrected
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 9\n"
