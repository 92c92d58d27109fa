"""Searching and sorting the devices page, and paging the audit log, on both store backends (a real
SQLite file and a real PostgreSQL database): the same request answers the same page on each."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet_server.store import FleetStore, IngestBatch
from fleet_server.store.device_order import DEVICE_SORTS, id_prefix_range, order_by_sql


@pytest.fixture
def store(any_store: FleetStore) -> FleetStore:
    return any_store


def _fill(store: FleetStore) -> None:
    """Twelve devices: cam-00..cam-07 and gw-0..gw-2 reporting, gw_x registered only (no report)."""
    batch = IngestBatch()
    for i in range(8):
        device = f"cam-{i:02d}"
        drift = {"count": i % 3, "corrected": False, "resources": []}
        batch.add("status", {"schema": 1, "device": device, "ts": 100.0 + i, "release": 7 - i % 2,
                             "sync_state": ("in_sync", "drifted", "failed")[i % 3], "drift": drift,
                             "paused": False}, 1000.0 + (i * 37) % 8)
        batch.add("online", {"schema": 1, "device": device, "ts": 100.0 + i, "online": i % 2 == 0}, 1000.0)
    for i in range(3):
        batch.add("status", {"schema": 1, "device": f"gw-{i}", "ts": 50.0, "release": 5,
                             "sync_state": "in_sync", "drift": {}, "paused": False}, 900.0 + i)
    store.apply_batch(batch)
    store.register_device("gw_x", labels={}, now=800.0)


def _page(store: FleetStore, **kw: Any) -> tuple[list[str], int]:
    page = json.loads(store.devices_page_json(**kw))
    return [d["id"] for d in page["devices"]], page["total"]


def test_id_prefix_search_uses_a_range_and_keeps_filters(store: FleetStore) -> None:
    _fill(store)
    assert _page(store, id_prefix="cam-0") == ([f"cam-{i:02d}" for i in range(8)], 8)
    assert _page(store, id_prefix="gw-") == (["gw-0", "gw-1", "gw-2"], 3)
    assert _page(store, id_prefix="gw") == (["gw-0", "gw-1", "gw-2", "gw_x"], 4)
    assert _page(store, id_prefix="cam-03") == (["cam-03"], 1)
    assert _page(store, id_prefix="nothing") == ([], 0)
    assert _page(store, id_prefix="cam", online=True, limit=2, offset=1) == (["cam-02", "cam-04"], 4)
    assert _page(store, id_prefix="cam", sync_state="failed") == (["cam-02", "cam-05"], 2)
    with pytest.raises(ValueError, match="id prefix"):
        id_prefix_range("cam%")


def _reference(store: FleetStore, key: str, descending: bool) -> list[str]:
    """The order a sort must give, computed in Python from the registry rows: NULLs last, then id."""
    rows = store.devices()

    def value(d: dict[str, Any]) -> Any:
        if key == "drift":
            return (d["drift"] or {}).get("count", 0) if isinstance(d["drift"], dict) else 0
        if key == "online":
            return 1 if d["online"] else 0
        return d[{"last_event": "last_event_ts"}.get(key, key)]

    present = sorted((r for r in rows if value(r) is not None), key=lambda r: (value(r), r["id"]),
                     reverse=descending)
    missing = sorted((r for r in rows if value(r) is None), key=lambda r: r["id"], reverse=descending)
    return [r["id"] for r in present + missing]


@pytest.mark.parametrize("key", DEVICE_SORTS)
@pytest.mark.parametrize("descending", [False, True])
def test_every_sort_key_orders_the_page_then_by_id(store: FleetStore, key: str, descending: bool) -> None:
    _fill(store)
    expected = _reference(store, key, descending)
    assert _page(store, sort=key, descending=descending, limit=1000) == (expected, 12)
    # paging through a sort is stable: the pages join into the whole order
    pages = [_page(store, sort=key, descending=descending, limit=5, offset=o)[0] for o in (0, 5, 10)]
    assert [d for p in pages for d in p] == expected


def test_an_unknown_sort_key_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot sort"):
        order_by_sql("sqlite", "labels", False)
    with pytest.raises(ValueError, match="cannot sort"):
        order_by_sql("sqlite", "id; DROP TABLE devices", False)


def test_the_audit_log_pages_by_id(store: FleetStore) -> None:
    for i in range(7):
        store.add_audit("ops", "baseline.move", "baseline", f"entry {i}", now=float(i))
    first = store.audit(limit=3)
    assert [e["reason"] for e in first] == ["entry 6", "entry 5", "entry 4"]
    second = store.audit(limit=3, before=first[-1]["id"])
    assert [e["reason"] for e in second] == ["entry 3", "entry 2", "entry 1"]
    assert [e["reason"] for e in store.audit(limit=3, before=second[-1]["id"])] == ["entry 0"]
    assert store.audit(before=1) == []
