"""The devices page built as JSON text by SQLite (``store/sqlite/pages.py``): real SQLite files in tmp_path.

The reference is :meth:`Store.devices` and :meth:`Store.count_devices`, which build the same page in
Python: the text must decode to exactly what they return, for every filter and page.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.store import IngestBatch, Store

_TS = 1796444526.192  # prints as 1796444526.19200 with SQLite's own 15 digits: must read back exactly


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "fleet.db")
    yield s
    s.close()


def _fill(store: Store, count: int) -> None:
    batch = IngestBatch()
    for i in range(count):
        device = f"dev{i:03d}"
        status: dict[str, Any] = {
            "schema": 1, "device": device, "ts": _TS + i * 0.1234567, "release": 5 if i % 3 else 4,
            "sync_state": "failed" if i % 4 == 0 else "in_sync", "paused": i % 5 == 0,
            "labels": {"site": "north" if i < 40 else "south", "ring": "canary" if i % 10 == 0 else "main"},
            "drift": {"files": [f"/etc/f{i}"], "n": i} if i % 7 == 0 else {},
            "last_error": f'quote " and \\ and \u00e9 {i}' if i % 9 == 0 else None,
        }
        batch.add("status", status, _TS + i)
        if i % 3:  # a third never said whether it is online: online stays NULL
            batch.add("online", {"schema": 1, "device": device, "ts": _TS + i / 3, "online": i % 2 == 0},
                      _TS + i)
    store.apply_batch(batch)
    store.register_device("zz-registered", labels={"site": "north"}, now=1700000000.0)


def _reference(store: Store, filters: dict[str, Any], limit: int, offset: int) -> dict[str, Any]:
    return {"devices": store.devices(**filters, limit=limit, offset=offset),
            "total": store.count_devices(**filters), "limit": limit, "offset": offset}


@pytest.mark.parametrize("filters", [
    {}, {"label": {"site": "north"}}, {"label": {"site": "south", "ring": "canary"}},
    {"sync_state": "failed"}, {"online": True}, {"online": False},
    {"label": {"site": "north"}, "online": False, "sync_state": "in_sync"},
    {"label": {"site'; DROP TABLE devices; --": "x"}},
])
@pytest.mark.parametrize(("limit", "offset"), [(100, 0), (1000, 0), (7, 3), (50, 130), (1, 150)])
def test_the_page_reads_as_the_python_page(store: Store, filters: dict[str, Any], limit: int,
                                           offset: int) -> None:
    _fill(store, 150)
    page = json.loads(store.devices_page_json(**filters, limit=limit, offset=offset))
    assert page == _reference(store, filters, limit, offset)


def test_values_keep_their_types_and_every_digit(store: Store) -> None:
    _fill(store, 150)
    page = json.loads(store.devices_page_json(limit=1000))
    by_id = {d["id"]: d for d in page["devices"]}
    assert [d["id"] for d in page["devices"]] == sorted(by_id)
    first = by_id["dev000"]
    assert first["status_ts"] == _TS
    assert isinstance(first["status_ts"], float)
    assert by_id["zz-registered"]["first_seen"] == 1700000000.0
    assert isinstance(by_id["zz-registered"]["first_seen"], float)
    assert (first["online"], first["paused"], first["registered"]) == (None, True, None)
    assert (by_id["dev002"]["online"], by_id["dev001"]["online"]) == (True, False)
    assert by_id["zz-registered"]["registered"] is True
    assert first["drift"] == {"files": ["/etc/f0"], "n": 0}
    assert by_id["dev001"]["drift"] == {}
    assert by_id["zz-registered"]["drift"] is None
    assert by_id["zz-registered"]["release"] is None
    assert by_id["dev009"]["last_error"] == 'quote " and \\ and \u00e9 9'
    assert list(first) == list(store.devices(limit=1)[0])  # the same fields in the same order


def test_unreadable_stored_json_reads_as_the_python_page_does(store: Store, tmp_path: Path) -> None:
    _fill(store, 3)
    conn = sqlite3.connect(tmp_path / "fleet.db")
    with conn:
        conn.execute("UPDATE devices SET labels = 'not json', drift = '{broken' WHERE id = 'dev001'")
        conn.execute("UPDATE devices SET labels = '[1, 2]' WHERE id = 'dev002'")
    conn.close()
    page = json.loads(store.devices_page_json())
    by_id = {d["id"]: d for d in page["devices"]}
    assert (by_id["dev001"]["labels"], by_id["dev001"]["drift"]) == ({}, None)
    assert by_id["dev002"]["labels"] == {}  # labels are an object or nothing
    assert page["devices"][:2] == _reference(store, {}, 100, 0)["devices"][:2]


def test_an_empty_registry_is_an_empty_page(store: Store) -> None:
    assert json.loads(store.devices_page_json()) == {"devices": [], "total": 0, "limit": 100, "offset": 0}
    assert json.loads(store.devices_page_json(limit=-5, offset=-1)) == {"devices": [], "total": 0, "limit": 0,
                                                                        "offset": 0}
