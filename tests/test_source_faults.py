"""Source against a flaky network: a fault proxy in front of a real ``git daemon``.

Every fault must end in FetchError within the timeout, leave the cache exactly as it was (the last
fetched commit still readable and answered from the cache), and a later fetch through a healthy
network must converge on the mirror's head.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_core.errors import FetchError
from edge_core.source import FetchResult, Source
from tests.support.faultproxy import FaultProxy
from tests.support.gitrepo import WorkRepo, git, make_bare
from tests.support.mirror import GitDaemon

__all__: list[str] = []

_TIMEOUT = 1.0
_BLOB_SIZE = 200_000
_FAULT_AT = 100_000  # well inside the incompressible blob of the second commit's pack


def _payload(count: int = 20) -> dict[str, str | bytes]:
    return {f"bundles/b{i % 3}/file{i}.conf": f"# file {i}\n" + "setting = value\n" * (10 + i)
            for i in range(count)}


def _as_bytes(files: dict[str, str | bytes]) -> dict[str, bytes]:
    return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}


@dataclass
class Flaky:
    """A mirror behind a fault proxy, a working repo pushing to it, and a cache holding ``first``."""

    proxy: FaultProxy
    work: WorkRepo
    bare: Path
    source: Source
    first: str

    def push(self, files: dict[str, str | bytes], message: str) -> str:
        return self.work.commit_and_push(self.bare, files, message)

    def cache_state(self) -> tuple[set[str], str]:
        """The cache's object files and refs: what must not change when a fetch fails."""
        cache = self.source.cache_dir
        objects = {str(p.relative_to(cache)) for p in (cache / "objects").rglob("*") if p.is_file()}
        return objects, git("for-each-ref", cwd=cache)

    def assert_still_serves_first(self) -> None:
        assert self.source.read_tree(self.first) == _as_bytes(_payload())
        connections = self.proxy.connections
        assert self.source.fetch(self.first) == FetchResult(self.first, 0, True)
        assert self.proxy.connections == connections  # answered from the cache, no network


@pytest.fixture
def flaky(tmp_path: Path, mirror_root: Path, git_daemon: GitDaemon) -> Iterator[Flaky]:
    work = WorkRepo.create(tmp_path / "work")
    bare = make_bare(mirror_root / "fleet.git")
    first = work.commit_and_push(bare, _payload(), "initial")
    with FaultProxy("127.0.0.1", git_daemon.port) as proxy, \
            Source(f"git://127.0.0.1:{proxy.port}/fleet.git", "main", tmp_path / "cache",
                   timeout=_TIMEOUT) as source:
        assert source.fetch().commit == first
        assert proxy.connections == 1
        yield Flaky(proxy, work, bare, source, first)


@pytest.mark.parametrize("fault", ["drop", "reset", "blackhole"])
def test_connection_fault_keeps_cache_then_converges(flaky: Flaky, fault: str) -> None:
    second = flaky.push({"bundles/b1/file1.conf": "setting = changed\n"}, "second")
    before = flaky.cache_state()
    getattr(flaky.proxy, fault)()
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        flaky.source.fetch()
    elapsed = time.monotonic() - started
    print(f"{fault}: {caught.value} after {elapsed:.2f}s")
    assert elapsed < _TIMEOUT + 1.5
    assert flaky.proxy.connections == 2
    assert "git://127.0.0.1" in str(caught.value)
    if fault == "blackhole":
        assert f"no answer within {_TIMEOUT:g}s" in str(caught.value)
        assert elapsed >= _TIMEOUT * 0.9
    assert flaky.cache_state() == before
    flaky.assert_still_serves_first()

    flaky.proxy.pass_through()
    result = flaky.source.fetch()
    assert result.commit == second
    assert not result.up_to_date
    assert flaky.source.read_tree(second)["bundles/b1/file1.conf"] == b"setting = changed\n"
    assert flaky.source.fetch() == FetchResult(second, 0, True)


def test_slow_network_within_the_timeout_still_fetches(flaky: Flaky) -> None:
    second = flaky.push({"bundles/b2/new.conf": "new\n"}, "second")
    flaky.proxy.delay(0.3)
    started = time.monotonic()
    assert flaky.source.fetch().commit == second
    assert time.monotonic() - started >= 0.3


def test_network_slower_than_the_timeout_fails(flaky: Flaky) -> None:
    flaky.push({"bundles/b2/new.conf": "new\n"}, "second")
    before = flaky.cache_state()
    flaky.proxy.delay(5.0)
    started = time.monotonic()
    with pytest.raises(FetchError, match=f"no answer within {_TIMEOUT:g}s"):
        flaky.source.fetch()
    assert time.monotonic() - started < _TIMEOUT + 1.5
    assert flaky.cache_state() == before
    flaky.assert_still_serves_first()


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_damaged_pack_leaves_nothing_new_then_converges(flaky: Flaky, fault: str) -> None:
    blob = os.urandom(_BLOB_SIZE)
    second = flaky.push({"blobs/random.bin": blob}, "big")
    before = flaky.cache_state()
    if fault == "truncate":
        flaky.proxy.truncate_after(_FAULT_AT)
    else:
        flaky.proxy.corrupt(_FAULT_AT)
    with pytest.raises(FetchError) as caught:
        flaky.source.fetch()
    print(f"{fault}: {caught.value}")
    assert any(word in str(caught.value) for word in ("hung up", "protocol error", "corrupt pack"))
    # The fault landed inside the pack data, not in the ref advertisement before it.
    assert flaky.proxy.wait_idle(2.0)
    assert flaky.proxy.connections == 2
    stream = flaky.proxy.server_streams[-1]
    assert 0 <= stream.index(b"PACK") < _FAULT_AT
    if fault == "corrupt":
        assert len(stream) > _BLOB_SIZE
    assert flaky.cache_state() == before
    with pytest.raises(FetchError, match="not in the cache"):
        flaky.source.commit_raw(second)
    flaky.assert_still_serves_first()

    flaky.proxy.pass_through()
    result = flaky.source.fetch()
    assert result.commit == second
    assert result.bytes_received > _BLOB_SIZE
    assert flaky.source.read_tree(second)["blobs/random.bin"] == blob


def test_fault_proxy_modes_on_a_raw_socket(git_daemon: GitDaemon) -> None:
    """The proxy does what each mode says, seen from a plain client socket."""
    with FaultProxy("127.0.0.1", git_daemon.port) as proxy:
        proxy.drop()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
            assert sock.recv(16) == b""  # an orderly close, before any byte
        proxy.reset()
        # The reset may reach the client while connect() is still returning on a loaded
        # machine, or at its first read: either way the client sees a reset, never bytes.
        with pytest.raises(ConnectionResetError), \
                socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
            sock.recv(16)
        proxy.blackhole()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.2) as sock:
            sock.sendall(b"0000")
            with pytest.raises(TimeoutError):
                sock.recv(16)
        with pytest.raises(ValueError):
            proxy.truncate_after(-1)
        assert proxy.connections == 3
