"""A hostile mirror floods or drips its ref advertisement: the fetch stops at the documented caps
(``repo.max_refs``, ``repo.max_ref_advertisement_bytes``) or at ``repo.fetch_deadline``, with a
reason naming the key, instead of growing memory without bound or holding the fetch forever.

Before the fix an endless advertisement grew memory until ``MemoryError``, and a mirror sending one
pkt-line every second under a 5 s ``repo.timeout`` kept a fetch running indefinitely.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.fetch_child import run_child
from tests.support.hostile_git import HostileGitServer, HostileHttpServer

LIMIT_MIB = 512
RSS_BOUND_KIB = 256 * 1024


@pytest.mark.parametrize(("ref_name_bytes", "limits", "key"), [
    (20, {}, "repo.max_refs (10000)"),
    (2000, {"max_refs": 1_000_000}, "repo.max_ref_advertisement_bytes (2097152)"),
], ids=["count", "bytes"])
def test_endless_ref_advertisement_is_cut_off(tmp_path: Path, ref_name_bytes: int, limits: dict[str, int],
                                              key: str) -> None:
    with HostileGitServer(endless_refs=True, ref_name_bytes=ref_name_bytes) as mirror:
        got = run_child({"mode": "fetch", "url": mirror.url(), "cache": str(tmp_path / "cache"),
                         "limit_mib": LIMIT_MIB, "limits": limits})
        sent = mirror.lines_sent
    print(f"endless advertisement ({ref_name_bytes}-byte names): {got}; the mirror sent {sent} lines")
    assert got["error"] == "FetchError"
    assert f"exceeds {key}" in got["reason"]
    assert got["peak_rss_kib"] < RSS_BOUND_KIB


def test_dripping_mirror_is_cut_off_at_the_fetch_deadline(tmp_path: Path) -> None:
    # One ref a second for up to 60 s; each read comes well within repo.timeout (5 s), so only an
    # overall deadline ends the fetch.
    with HostileGitServer(drip=1.0, max_lines=60) as mirror:
        started = time.monotonic()
        got = run_child({"mode": "fetch", "url": mirror.url(), "cache": str(tmp_path / "cache"),
                         "timeout": 5.0, "limit_mib": LIMIT_MIB, "limits": {"fetch_deadline": 3.0}})
        elapsed = time.monotonic() - started
        sent = mirror.lines_sent
    print(f"dripping mirror: {got} after {elapsed:.1f}s ({sent} lines sent)")
    assert got["error"] == "FetchError"
    assert got["reason"].startswith("fetch exceeds repo.fetch_deadline (3s)")
    assert sent < 60  # cut off long before the drip ran dry


def test_endless_http_advertisement_is_cut_off_in_bytes(tmp_path: Path) -> None:
    with HostileHttpServer(endless_refs=True) as mirror:
        got = run_child({"mode": "fetch", "url": mirror.url(), "cache": str(tmp_path / "cache"),
                         "limit_mib": LIMIT_MIB})
    print(f"endless HTTP advertisement: {got}")
    assert got["error"] == "FetchError"
    assert "exceeds repo.max_ref_advertisement_bytes (2097152)" in got["reason"]
    assert got["peak_rss_kib"] < RSS_BOUND_KIB


def test_dripping_http_mirror_is_cut_off_at_the_fetch_deadline(tmp_path: Path) -> None:
    with HostileHttpServer(drip=1.0, max_lines=60) as mirror:
        got = run_child({"mode": "fetch", "url": mirror.url(), "cache": str(tmp_path / "cache"),
                         "timeout": 5.0, "limit_mib": LIMIT_MIB, "limits": {"fetch_deadline": 3.0}})
        sent = mirror.lines_sent
    print(f"dripping HTTP mirror: {got} ({sent} lines sent)")
    assert got["error"] == "FetchError"
    assert got["reason"].startswith("fetch exceeds repo.fetch_deadline (3s)")
    assert sent < 60
