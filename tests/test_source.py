"""Source: shallow, incremental, size-capped fetches from real mirrors (file, git daemon, smart HTTP)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_core.errors import FetchError, FileIntegrityError
from edge_core.source import FetchResult, Source, SourceAuth
from tests.support.gitrepo import WorkRepo, git, make_bare
from tests.support.mirror import (
    GitDaemon,
    SilentServer,
    SmartHttpMirror,
    git_daemon,
    http_mirror,
    mirror_root,
)

__all__ = ["git_daemon", "http_mirror", "mirror_root"]  # fixtures used by this module


def _payload(count: int = 40) -> dict[str, str]:
    return {
        f"bundles/b{i % 5}/file{i}.conf": f"# file {i}\n" + "setting = value\n" * (20 + i)
        for i in range(count)
    }


class Fleet:
    """A working repo pushed to the bare mirror ``mirror_root/fleet.git``."""

    def __init__(self, root: Path, mirror_root: Path) -> None:
        self.work = WorkRepo.create(root / "work")
        self.bare = make_bare(mirror_root / "fleet.git")
        self.files: dict[str, dict[str, str | bytes]] = {}
        self.current: dict[str, str | bytes] = {}

    def commit(self, changes: dict[str, str | bytes], message: str = "change") -> str:
        sha = self.work.commit_and_push(self.bare, changes, message)
        self.current = {**self.current, **changes}
        self.files[sha] = dict(self.current)
        return sha

    def expected(self, sha: str) -> dict[str, bytes]:
        return {k: v.encode() if isinstance(v, str) else v for k, v in self.files[sha].items()}


@pytest.fixture
def fleet(tmp_path: Path, mirror_root: Path) -> Fleet:
    repo = Fleet(tmp_path, mirror_root)
    repo.commit(_payload(), "initial")
    return repo


def _source(url: str, tmp_path: Path, name: str = "cache", **kwargs: object) -> Source:
    return Source(url, "main", tmp_path / name, **kwargs)  # type: ignore[arg-type]


def _pack_files(cache: Path) -> set[str]:
    return {p.name for p in (cache / "objects").rglob("*") if p.is_file()}


# -- transports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file-url", "plain-path"])
def test_fetch_from_local_path(fleet: Fleet, tmp_path: Path, form: str) -> None:
    head = fleet.work.head()
    url = f"file://{fleet.bare}" if form == "file-url" else str(fleet.bare)
    with _source(url, tmp_path) as source:
        result = source.fetch()
        assert result == FetchResult(head, result.bytes_received, False)
        assert result.bytes_received > 0
        assert source.read_tree(head) == fleet.expected(head)
        assert source.fetch() == FetchResult(head, 0, True)


def test_fetch_over_git_daemon(fleet: Fleet, git_daemon: GitDaemon, tmp_path: Path) -> None:
    head = fleet.work.head()
    with _source(git_daemon.url("fleet.git"), tmp_path) as source:
        result = source.fetch()
        assert result.commit == head
        assert not result.up_to_date
        assert source.read_tree(head) == fleet.expected(head)
        assert source.fetch() == FetchResult(head, 0, True)


def test_fetch_over_smart_http(fleet: Fleet, http_mirror: SmartHttpMirror, tmp_path: Path) -> None:
    head = fleet.work.head()
    with _source(http_mirror.url("fleet.git"), tmp_path) as source:
        assert source.fetch().commit == head
        assert source.read_tree(head) == fleet.expected(head)
    assert http_mirror.requests >= 2


def test_http_token_required(fleet: Fleet, mirror_root: Path, tmp_path: Path) -> None:
    head = fleet.work.head()
    with SmartHttpMirror(mirror_root, token="s3cret-token") as mirror:
        url = mirror.url("fleet.git")
        with _source(url, tmp_path, "good", auth=SourceAuth(token="s3cret-token")) as source:
            assert source.fetch().commit == head
        basic = SourceAuth(username="ops", password="s3cret-token")
        with _source(url, tmp_path, "basic", auth=basic) as source:
            assert source.fetch().commit == head
        with _source(url, tmp_path, "wrong", auth=SourceAuth(token="not-the-token")) as source, \
                pytest.raises(FetchError, match="401") as wrong:
            source.fetch()
        assert "not-the-token" not in str(wrong.value)
        with _source(url, tmp_path, "none") as source, pytest.raises(FetchError, match="401"):
            source.fetch()
    assert "s3cret" not in repr(SourceAuth(token="s3cret-token"))


# -- incremental and specific revisions ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["git", "http", "file"])
def test_one_changed_file_transfers_little(fleet: Fleet, mirror_root: Path, tmp_path: Path,
                                           transport: str) -> None:
    server: GitDaemon | SmartHttpMirror | None = None
    if transport == "git":
        server = GitDaemon(mirror_root)
    elif transport == "http":
        server = SmartHttpMirror(mirror_root)
    if server is not None:
        server.start()
    try:
        url = server.url("fleet.git") if server is not None else f"file://{fleet.bare}"
        with _source(url, tmp_path) as source:
            first = source.fetch()
            second_sha = fleet.commit({"bundles/b1/file1.conf": "setting = changed\n"}, "one file")
            second = source.fetch()
            print(f"{transport}: first fetch {first.bytes_received} bytes, "
                  f"one-file change {second.bytes_received} bytes")
            assert second.commit == second_sha
            assert not second.up_to_date
            assert 0 < second.bytes_received < first.bytes_received / 4
            assert second.bytes_received < 2000
            assert source.read_tree(second_sha) == fleet.expected(second_sha)
            # The earlier commit is still readable from the cache.
            assert source.read_tree(first.commit) == fleet.expected(first.commit)
    finally:
        if server is not None:
            server.stop()


def test_fetch_an_assigned_older_sha(fleet: Fleet, git_daemon: GitDaemon, tmp_path: Path) -> None:
    first = fleet.work.head()
    second = fleet.commit({"bundles/b0/new.conf": "new\n"}, "second")
    third = fleet.commit({"bundles/b0/new.conf": "newer\n"}, "third")
    with _source(git_daemon.url("fleet.git"), tmp_path) as source:
        fetched = source.fetch(first)
        assert fetched.commit == first
        assert not fetched.up_to_date
        assert source.read_tree(first) == fleet.expected(first)
        assert source.fetch(second).commit == second
        assert source.read_tree(second) == fleet.expected(second)
        assert source.fetch().commit == third
        # Already cached: answered without the mirror.
        git_daemon.stop()
        assert source.fetch(second) == FetchResult(second, 0, True)


def test_mirror_refusing_sha_wants_falls_back_to_branch_history(tmp_path: Path) -> None:
    root = tmp_path / "strict"
    fleet = Fleet(tmp_path / "w", root)
    git("config", "--unset-all", "uploadpack.allowAnySHA1InWant", cwd=fleet.bare)
    git("config", "--unset-all", "uploadpack.allowReachableSHA1InWant", cwd=fleet.bare)
    old = fleet.commit(_payload(10), "old")
    fleet.commit({"x.conf": "x\n"}, "head")
    with GitDaemon(root, allow_sha_wants=False) as daemon, \
            _source(daemon.url("fleet.git"), tmp_path) as source:
        result = source.fetch(old)
        assert result.commit == old
        assert source.read_tree(old) == fleet.expected(old)
        with pytest.raises(FetchError, match="0123456789abcdef0123456789abcdef01234567"):
            source.fetch("0123456789abcdef0123456789abcdef01234567")


def test_commit_raw_and_time(fleet: Fleet, tmp_path: Path) -> None:
    head = fleet.work.head()
    with _source(str(fleet.bare), tmp_path) as source:
        source.fetch()
        raw = source.commit_raw(head)
        assert raw == git("cat-file", "commit", head, cwd=fleet.bare).encode()
        assert source.commit_time(head) == int(git("log", "-1", "--format=%ct", head, cwd=fleet.bare))
        with pytest.raises(FetchError, match="not in the cache"):
            source.commit_raw("0" * 40)


# -- refusals --------------------------------------------------------------------------------------


def test_symlink_in_tree_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.work.symlink("bundles/b0/link", "/etc/shadow")
    sha = fleet.work.commit("symlink")
    fleet.work.push(fleet.bare)
    with _source(str(fleet.bare), tmp_path) as source:
        source.fetch()
        with pytest.raises(FileIntegrityError, match=r"symlink.*bundles/b0/link"):
            source.read_tree(sha)


def test_submodule_in_tree_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    git("update-index", "--add", "--cacheinfo", f"160000,{fleet.work.head()},vendor/sub", cwd=fleet.work.path)
    git("commit", "--quiet", "-m", "submodule", cwd=fleet.work.path)
    sha = fleet.work.head()
    fleet.work.push(fleet.bare)
    with _source(str(fleet.bare), tmp_path) as source:
        source.fetch()
        with pytest.raises(FileIntegrityError, match=r"submodule.*vendor/sub"):
            source.read_tree(sha)


def test_read_tree_limits(fleet: Fleet, tmp_path: Path) -> None:
    head = fleet.work.head()
    with _source(str(fleet.bare), tmp_path) as source:
        source.fetch()
        with pytest.raises(FileIntegrityError, match="more than 10 files"):
            source.read_tree(head, max_files=10)
        with pytest.raises(FileIntegrityError, match="over the 100 limit"):
            source.read_tree(head, max_file_bytes=100)
        with pytest.raises(FileIntegrityError, match="1000-byte limit"):
            source.read_tree(head, max_total_bytes=1000)


def test_bad_input_is_refused(fleet: Fleet, git_daemon: GitDaemon, tmp_path: Path) -> None:
    with _source(git_daemon.url("fleet.git"), tmp_path) as source, pytest.raises(FetchError, match="sha"):
        source.fetch("HEAD~1")
    with Source(git_daemon.url("fleet.git"), "nope", tmp_path / "c2") as source, \
            pytest.raises(FetchError, match="no branch 'nope'"):
        source.fetch()
    with _source(git_daemon.url("missing.git"), tmp_path, "c3") as source, pytest.raises(FetchError):
        source.fetch()
    with pytest.raises(ValueError):
        Source("ftp://127.0.0.1/x.git", "main", tmp_path / "c4")
    with pytest.raises(ValueError):
        Source("git://127.0.0.1/x.git", "../main", tmp_path / "c5")


# -- failures leave the cache as it was ------------------------------------------------------------


def test_lock_files_left_by_a_killed_fetch_are_cleared(fleet: Fleet, tmp_path: Path) -> None:
    """A fetch killed while it held a ref lock leaves the lock file: the next fetch is refused with a
    reason (not a crash) until the stale locks are cleared, which the agent does under its apply lock."""
    first = fleet.work.head()
    cache = tmp_path / "cache"
    with _source(str(fleet.bare), tmp_path) as source:
        source.fetch()
        second = fleet.commit({"bundles/b2/file2.conf": "changed\n"})
        (cache / "refs" / "heads" / "main.lock").write_text(first + "\n")
        (cache / "shallow.lock").write_text("")
        with pytest.raises(FetchError, match=r"in the cache: it is locked"):
            source.fetch()
        assert sorted(source.clear_stale_locks()) == ["refs/heads/main.lock", "shallow.lock"]
        assert source.clear_stale_locks() == []
        assert source.fetch().commit == second


def test_mirror_down_then_back(fleet: Fleet, git_daemon: GitDaemon, tmp_path: Path) -> None:
    url = git_daemon.url("fleet.git")
    first = fleet.work.head()
    with _source(url, tmp_path, timeout=2.0) as source:
        source.fetch()
        second = fleet.commit({"bundles/b2/file2.conf": "changed\n"})
        git_daemon.stop()
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"mirror unreachable: connection refused \(git://127\.0\.0\.1"):
            source.fetch()
        assert time.monotonic() - started < 2.0
        assert source.read_tree(first) == fleet.expected(first)
        git_daemon.start()
        assert source.fetch().commit == second


def test_hung_mirror_times_out(tmp_path: Path) -> None:
    with SilentServer() as silent:
        for url in (f"git://127.0.0.1:{silent.port}/fleet.git", f"http://127.0.0.1:{silent.port}/fleet.git"):
            started = time.monotonic()
            with _source(url, tmp_path, "c-" + url[:4], timeout=0.5) as source, \
                    pytest.raises(FetchError, match=r"no answer within 0\.5s"):
                source.fetch()
            assert time.monotonic() - started < 5.0


def test_pack_over_max_bytes_is_refused(fleet: Fleet, git_daemon: GitDaemon, tmp_path: Path) -> None:
    first = fleet.work.head()
    with _source(git_daemon.url("fleet.git"), tmp_path, max_bytes=60_000) as source:
        source.fetch()
        before = _pack_files(source.cache_dir)
        fleet.commit({"blobs/random.bin": os.urandom(200_000)}, "big")
        with pytest.raises(FetchError, match="exceeds the 60000-byte limit"):
            source.fetch()
        assert _pack_files(source.cache_dir) == before
        assert source.read_tree(first) == fleet.expected(first)
        assert source.fetch(first).up_to_date


def _truncate(body: bytes) -> bytes:
    """Cut the pack response short (other upload-pack responses, such as ls-refs, pass)."""
    if b"PACK" not in body:
        return body
    return body[: len(body) - 300]


def _flip_pack_byte(body: bytes) -> bytes:
    """Flip one byte inside the compressed pack data, keeping the pkt-line framing intact."""
    if b"PACK" not in body:
        return body
    at = body.index(b"PACK") + 120
    return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]


@pytest.mark.parametrize("mangle", [_truncate, _flip_pack_byte], ids=["truncated", "corrupt"])
def test_damaged_pack_leaves_cache_unchanged(fleet: Fleet, mirror_root: Path, tmp_path: Path,
                                             mangle: Callable[[bytes], bytes]) -> None:
    first = fleet.work.head()
    cache = tmp_path / "cache"
    with Source(f"file://{fleet.bare}", "main", cache) as source:
        source.fetch()
    before = _pack_files(cache)
    refs_before = git("for-each-ref", cwd=cache)
    fleet.commit({f"bundles/b3/extra{i}.conf": f"value {i}\n" * 50 for i in range(20)}, "more")
    # The same cache, now fetched through a mirror that damages the pack on the wire.
    with SmartHttpMirror(mirror_root, mangle=mangle) as bad, \
            Source(bad.url("fleet.git"), "main", cache) as source:
        with pytest.raises(FetchError) as caught:
            source.fetch()
        print(f"{mangle.__name__}: {caught.value}")
        assert any(word in str(caught.value) for word in ("hung up", "protocol error", "corrupt pack"))
        assert _pack_files(source.cache_dir) == before
        assert git("for-each-ref", cwd=source.cache_dir) == refs_before
        assert source.read_tree(first) == fleet.expected(first)


def test_ssh_mirror_needs_pinned_host_key(tmp_path: Path) -> None:
    # The configuration rule: an ssh:// mirror without a pinned known_hosts file is refused up
    # front (tests/test_source_ssh.py fetches from a live sshd).
    with pytest.raises(ValueError, match="known_hosts"):
        Source("ssh://git@127.0.0.1:2222/fleet.git", "main", tmp_path / "c")


def test_a_bug_in_our_own_fetch_code_surfaces_instead_of_a_retried_fetch_error(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A programming error raised in the project's own code inside the broad dulwich catch is not
    turned into a FetchError (which the daemon would retry forever); dulwich's own errors still are."""
    with _source(f"file://{fleet.bare}", tmp_path) as source:
        repo = source._open_repo()
        # our code then fails on limits.max_refs
        source._mirror = dataclasses.replace(source._mirror, limits=None)  # type: ignore[arg-type]
        with pytest.raises(AttributeError, match="max_refs"):
            source._fetch_once(repo, None, 1, deepen=True)  # the negotiating transport
    with _source(str(tmp_path / "no-such-mirror"), tmp_path, "cache2") as source, pytest.raises(FetchError):
        source.fetch()
