"""The cached read behind ``GET /api/v1/summary``: a copy at most ``ttl`` old, refreshed in the
background, never stale forever. A controlled clock; the refresh is the real thread."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fleet_server.api.cache import CachedRead
from fleet_server.errors import StoreError
from tests.support.wait import wait_until


class Counter:
    """A read that answers how many times it ran; can be made to fail or to block."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> dict[str, Any]:
        assert self.gate.wait(10.0)
        if self.fail:
            raise StoreError("database is locked")
        self.calls += 1
        return {"n": self.calls}



def test_a_copy_is_served_then_refreshed_in_the_background() -> None:
    now = [1000.0]
    read = Counter()
    cache = CachedRead(read, ttl=2.0, max_stale=30.0, clock=lambda: now[0])
    assert cache.get() == {"n": 1, "as_of": 1000.0}
    now[0] = 1001.5
    assert cache.get()["n"] == 1  # within the ttl: no recount
    assert read.calls == 1
    read.gate.clear()  # the recount will block until released
    now[0] = 1003.0
    assert cache.get() == {"n": 1, "as_of": 1000.0}  # the old copy, at once
    assert cache.get()["n"] == 1  # one refresh at a time
    read.gate.set()
    wait_until(lambda: cache.get()["n"] == 2, "the background refresh", 10.0, 0.01)
    assert cache.get() == {"n": 2, "as_of": 1003.0}
    assert read.calls == 2


def test_a_failing_store_surfaces_once_the_copy_is_too_old(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    read = Counter()
    cache = CachedRead(read, ttl=2.0, max_stale=30.0, clock=lambda: now[0])
    cache.get()
    read.fail = True
    now[0] = 5.0
    assert cache.get()["n"] == 1  # stale but within max_stale; the refresh fails and is logged
    wait_until(lambda: "cannot refresh a cached read" in caplog.text, "the refresh warning", 10.0, 0.01)
    now[0] = 31.0
    with pytest.raises(StoreError):
        cache.get()
    read.fail = False
    assert cache.get() == {"n": 2, "as_of": 31.0}


def test_the_first_read_fails_loudly() -> None:
    read = Counter()
    read.fail = True
    with pytest.raises(StoreError):
        CachedRead(read).get()
