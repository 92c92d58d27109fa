"""Source over ssh://: fetches from a real OpenSSH server on loopback, with pinned host keys.

The mirror is ``ssh://<user>@127.0.0.1:<port>/<absolute path of a bare repository>``; the server is
``/usr/sbin/sshd`` with its own host key, the client uses its own ed25519 key and a known_hosts file
holding only the server's key. These tests fail (they do not skip) when sshd is missing and the
suite runs as root, see ``tests/support/sshd.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_core.errors import FetchError
from edge_core.source import FetchResult, Source, SourceAuth
from tests.support.faultproxy import FaultProxy
from tests.support.gitrepo import WorkRepo, git, make_bare
from tests.support.sshd import Sshd, make_ssh_key, require_sshd

__all__: list[str] = []


def _payload(count: int = 30) -> dict[str, str | bytes]:
    return {f"bundles/b{i % 3}/file{i}.conf": f"# file {i}\n" + "setting = value\n" * (20 + i)
            for i in range(count)}


def _as_bytes(files: dict[str, str | bytes]) -> dict[str, bytes]:
    return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}


def _chain(exc: BaseException) -> str:
    """The messages of ``exc`` and everything that caused it (ssh's own reason is in the cause)."""
    texts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(texts) < 10:
        texts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    return " | ".join(texts)


@dataclass
class SshMirror:
    """A bare repository served by a running sshd, a working repo pushing to it, and client creds."""

    server: Sshd
    work: WorkRepo
    bare: Path
    key: Path
    known_hosts: Path
    root: Path

    @property
    def url(self) -> str:
        return self.server.url(self.bare)

    def auth(self, key: Path | None = None, known_hosts: Path | None = None) -> SourceAuth:
        return SourceAuth(ssh_key=key or self.key, ssh_known_hosts=known_hosts or self.known_hosts)

    def source(self, name: str = "cache", *, url: str | None = None, timeout: float = 5.0,
               auth: SourceAuth | None = None) -> Source:
        return Source(url or self.url, "main", self.root / name, auth=auth or self.auth(), timeout=timeout)

    def logins(self) -> int:
        return self.server.log_text().count("Accepted publickey")


@pytest.fixture
def ssh_mirror(tmp_path: Path) -> Iterator[SshMirror]:
    require_sshd()
    work = WorkRepo.create(tmp_path / "work")
    bare = make_bare(tmp_path / "mirrors" / "fleet.git")
    work.commit_and_push(bare, _payload(), "initial")
    key = make_ssh_key(tmp_path / "client" / "id_ed25519")
    with Sshd(tmp_path / "sshd") as server:
        server.authorize(key.with_suffix(".pub"))
        known_hosts = server.write_known_hosts(tmp_path / "client" / "known_hosts")
        yield SshMirror(server, work, bare, key, known_hosts, tmp_path)


def test_fetch_and_read_tree_over_ssh(ssh_mirror: SshMirror) -> None:
    head = ssh_mirror.work.head()
    assert ssh_mirror.url.startswith(f"ssh://{ssh_mirror.server.user}@127.0.0.1:{ssh_mirror.server.port}/")
    with ssh_mirror.source() as source:
        first = source.fetch()
        assert first.commit == head
        assert not first.up_to_date
        assert first.bytes_received > 0
        assert source.read_tree(head) == _as_bytes(_payload())
        assert source.commit_raw(head) == git("cat-file", "commit", head, cwd=ssh_mirror.bare).encode()
        assert source.fetch() == FetchResult(head, 0, True)
    # The bytes really came through sshd with the client's key.
    assert ssh_mirror.logins() >= 2


def test_incremental_fetch_over_ssh_transfers_little(ssh_mirror: SshMirror) -> None:
    with ssh_mirror.source() as source:
        first = source.fetch()
        changed: dict[str, str | bytes] = {"bundles/b1/file1.conf": "setting = changed\n"}
        second_sha = ssh_mirror.work.commit_and_push(ssh_mirror.bare, changed, "one file")
        second = source.fetch()
        print(f"ssh: first fetch {first.bytes_received} bytes, one-file change {second.bytes_received} bytes")
        assert second.commit == second_sha
        assert not second.up_to_date
        assert 0 < second.bytes_received < first.bytes_received / 4
        assert second.bytes_received < 2000
        assert source.read_tree(second_sha) == _as_bytes({**_payload(), **changed})
        assert source.read_tree(first.commit) == _as_bytes(_payload())


def test_wrong_host_key_is_refused(ssh_mirror: SshMirror, tmp_path: Path) -> None:
    impostor = make_ssh_key(tmp_path / "impostor" / "host_key")
    kind, blob = impostor.with_suffix(".pub").read_text(encoding="ascii").split()[:2]
    wrong = tmp_path / "client" / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{ssh_mirror.server.port} {kind} {blob}\n", encoding="ascii")
    with ssh_mirror.source("wrong", auth=ssh_mirror.auth(known_hosts=wrong)) as source, \
            pytest.raises(FetchError) as caught:
        source.fetch()
    assert "Host key verification failed" in _chain(caught.value)
    assert "Host key verification failed" in str(caught.value)  # ssh's reason reaches the user
    # An unknown host is refused too: no trust on first use, and nothing is added to known_hosts.
    empty = tmp_path / "client" / "empty_known_hosts"
    empty.write_text("", encoding="ascii")
    with ssh_mirror.source("unknown", auth=ssh_mirror.auth(known_hosts=empty)) as source, \
            pytest.raises(FetchError) as unknown:
        source.fetch()
    assert "Host key verification failed" in _chain(unknown.value)
    assert empty.read_text(encoding="ascii") == ""
    assert ssh_mirror.logins() == 0
    assert not (tmp_path / "wrong" / "refs" / "heads" / "main").exists()


def test_unauthorized_client_key_is_refused(ssh_mirror: SshMirror, tmp_path: Path) -> None:
    stranger = make_ssh_key(tmp_path / "stranger" / "id_ed25519")
    with ssh_mirror.source(auth=ssh_mirror.auth(key=stranger)) as source, \
            pytest.raises(FetchError) as caught:
        source.fetch()
    assert "Permission denied (publickey)" in _chain(caught.value)
    assert ssh_mirror.logins() == 0


def test_stopped_sshd_fails_fast_and_cache_survives(ssh_mirror: SshMirror) -> None:
    first = ssh_mirror.work.head()
    with ssh_mirror.source(timeout=2.0) as source:
        source.fetch()
        second = ssh_mirror.work.commit_and_push(ssh_mirror.bare, {"bundles/b2/new.conf": "new\n"}, "second")
        ssh_mirror.server.stop()
        started = time.monotonic()
        with pytest.raises(FetchError) as caught:
            source.fetch()
        assert time.monotonic() - started < 2.0
        assert "Connection refused" in _chain(caught.value)
        assert source.read_tree(first) == _as_bytes(_payload())
        assert source.fetch(first) == FetchResult(first, 0, True)
        ssh_mirror.server.start()  # same port, same host key
        assert source.fetch().commit == second


def test_half_open_ssh_mirror_times_out(ssh_mirror: SshMirror, tmp_path: Path) -> None:
    with FaultProxy("127.0.0.1", ssh_mirror.server.port) as proxy:
        proxy_hosts = tmp_path / "client" / "proxy_known_hosts"
        proxy_hosts.write_text(f"[127.0.0.1]:{proxy.port} {ssh_mirror.server.host_public_key}\n",
                               encoding="ascii")
        url = f"ssh://{ssh_mirror.server.user}@127.0.0.1:{proxy.port}{ssh_mirror.bare}"
        auth = ssh_mirror.auth(known_hosts=proxy_hosts)
        with ssh_mirror.source(url=url, auth=auth, timeout=1.0) as source:
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(FetchError):
                source.fetch()
            elapsed = time.monotonic() - started
            assert elapsed < 4.0, f"a silent ssh peer held the fetch for {elapsed:.1f}s"
            assert proxy.connections == 1
            proxy.pass_through()
            assert source.fetch().commit == ssh_mirror.work.head()
            assert proxy.connections == 2


def test_pack_over_max_bytes_over_ssh_is_refused_promptly(ssh_mirror: SshMirror) -> None:
    first = ssh_mirror.work.head()
    with Source(ssh_mirror.url, "main", ssh_mirror.root / "capped", auth=ssh_mirror.auth(), timeout=5.0,
                max_bytes=60_000) as source:
        source.fetch()
        refs_before = git("for-each-ref", cwd=source.cache_dir)
        blob: dict[str, str | bytes] = {"blobs/random.bin": os.urandom(300_000)}
        big = ssh_mirror.work.commit_and_push(ssh_mirror.bare, blob, "big")
        started = time.monotonic()
        with pytest.raises(FetchError, match="exceeds the 60000-byte limit"):
            source.fetch()
        # The ssh process is ended while the server is still sending, not waited out.
        assert time.monotonic() - started < 3.0
        assert git("for-each-ref", cwd=source.cache_dir) == refs_before
        with pytest.raises(FetchError, match="not in the cache"):
            source.commit_raw(big)
        assert source.read_tree(first) == _as_bytes(_payload())
