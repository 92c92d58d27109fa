"""The daemon's sync cache: the same verified commit is not re-read, but expiry, the rollback
floor and a new commit are always honoured."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from edge_agent.agent import SyncCache, sync_once
from tests.support.agent_fleet import AgentFleet, base_release


def test_cached_noop_still_corrects_drift_and_honours_expiry(fleet: AgentFleet) -> None:
    cache = SyncCache()
    first = fleet.publish(base_release(fleet.root), expires=timedelta(hours=1))
    assert sync_once(fleet.config, cache=cache).outcome == "applied"
    assert cache.verified is not None
    assert cache.verified.commit == first
    kept = cache.verified

    (fleet.root / "etc/motd").write_text("hand edit\n")
    again = sync_once(fleet.config, cache=cache)
    assert (again.outcome, again.commit) == ("applied", first)  # drift put back from the cache
    assert cache.verified is kept
    assert (fleet.root / "etc/motd").read_text() == "managed by edge-fleet\n"
    assert sync_once(fleet.config, cache=cache).outcome == "noop"

    late = datetime.now(UTC) + timedelta(hours=2)
    expired = sync_once(fleet.config, cache=cache, now=late)
    assert expired.outcome == "refused"
    assert "expired" in (expired.reason or "")

    second = fleet.publish({"bundles/app/files/app.conf": "listen = 9\n"})
    result = sync_once(fleet.config, cache=cache)
    assert (result.outcome, result.commit) == ("applied", second)
    assert cache.verified is not None
    assert cache.verified.commit == second
    assert (fleet.root / "etc/app/app.conf").read_text() == "listen = 9\n"
