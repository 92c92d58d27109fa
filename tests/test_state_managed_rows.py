"""Managed rows are serialised as they are written: a resource that cannot be serialised still
fails the whole write, and nothing of it is stored."""

from __future__ import annotations

import pytest

from edge_agent.state import Managed, StateDB
from edge_core.errors import StateError


def _rows(n: int, *, bad_at: int | None = None) -> list[Managed]:
    rows = []
    for i in range(n):
        spec: dict[str, object] = {"kind": "file", "path": f"/etc/f{i}"}
        if i == bad_at:
            spec["mode"] = {0o644}  # a set: not JSON
        rows.append(Managed(f"file:/etc/f{i}", "file", spec, f"d{i}", None, 1.0))
    return rows


def test_a_bad_row_fails_the_transaction_commit_and_writes_nothing(state: StateDB) -> None:
    state.begin_txn("t1", version=1, commit="c1")
    with pytest.raises(StateError, match="spec of file:/etc/f3"):
        state.finish_txn("t1", "committed", put=_rows(5, bad_at=3))
    assert state.managed() == {}
    open_txn = state.open_txn()
    assert open_txn is not None
    assert open_txn.txn_id == "t1"
    state.finish_txn("t1", "committed", put=_rows(5))
    assert sorted(state.managed()) == [f"file:/etc/f{i}" for i in range(5)]
    assert state.managed()["file:/etc/f4"].spec == {"kind": "file", "path": "/etc/f4"}


def test_update_managed_writes_all_or_nothing(state: StateDB) -> None:
    with pytest.raises(StateError, match="spec of file:/etc/f0"):
        state.update_managed(_rows(2, bad_at=0), ["file:/etc/gone"])
    assert state.managed() == {}
    state.update_managed(iter(_rows(2)), [])
    assert sorted(state.managed()) == ["file:/etc/f0", "file:/etc/f1"]
    state.update_managed([], ["file:/etc/f0"])
    assert sorted(state.managed()) == ["file:/etc/f1"]
