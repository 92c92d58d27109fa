"""Tests of edge_agent.fsafe against real files in a temporary device root."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent import fsafe, fsafe_backup, fsafe_fd
from edge_agent.errors import ApplyError
from edge_agent.fsafe import Entry, FsRoot
from edge_agent.fsafe_backup import referenced_blobs
from edge_agent.fsafe_fd import TEMP_PREFIX, is_temp_name
from edge_core.errors import ConfigError, ConfinementError, PathError

UID = os.getuid()
GID = os.getgid()
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "var").mkdir()
    (r / "var" / "keep").write_text("not managed")
    return r


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    (o / "sub").mkdir(parents=True)
    (o / "precious").write_text("must survive")
    (o / "sub" / "deep").write_text("must survive too")
    return o


@pytest.fixture
def fs(root: Path) -> Iterator[FsRoot]:
    with FsRoot(root, ("/etc", "/opt")) as f:
        yield f


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything below ``top``: kind, mode, owner and content or link target, by relative path."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, p.read_bytes())
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


# -- construction ---------------------------------------------------------------------------------


def test_all_is_pinned() -> None:
    assert set(fsafe.__all__) == {"DEFAULT_MAX_BYTES", "Entry", "FsRoot"}
    assert set(fsafe_backup.__all__) == {
        "RECORD_KINDS", "absent_record", "capture_at", "referenced_blobs", "restore"}
    assert {"TEMP_PREFIX", "ParentWalk", "is_temp_name"} <= set(fsafe_fd.__all__)


def test_missing_root_and_bad_allowed_roots_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        FsRoot(tmp_path / "nope", ("/etc",))
    with pytest.raises(ConfigError):
        FsRoot(tmp_path, ("etc",))
    with pytest.raises(ConfigError):
        FsRoot(tmp_path, ("/etc/../var",))


def test_closed_root_refuses_work(root: Path) -> None:
    f = FsRoot(root, ("/etc",))
    f.close()
    f.close()
    with pytest.raises(ApplyError):
        f.lstat("/etc/motd")


def test_whole_root_may_be_allowed(root: Path) -> None:
    with FsRoot(root, ("/",)) as f:
        f.write_file("/var/new", b"x", mode=0o600)
    assert (root / "var" / "new").read_bytes() == b"x"


# -- reading --------------------------------------------------------------------------------------


def test_lstat_describes_each_kind(fs: FsRoot, root: Path) -> None:
    (root / "etc" / "f").write_bytes(b"abc")
    os.chmod(root / "etc" / "f", 0o4755)
    (root / "etc" / "d").mkdir()
    os.symlink("/nowhere", root / "etc" / "l")
    os.mkfifo(root / "etc" / "p")
    assert fs.lstat("/etc/f") == Entry("file", 0o4755, UID, GID, 3, None)
    assert fs.lstat("/etc/d") is not None
    assert fs.lstat("/etc/d").kind == "dir"  # type: ignore[union-attr]
    assert fs.lstat("/etc/l") == Entry("symlink", fs.lstat("/etc/l").mode, UID, GID, 8, "/nowhere")  # type: ignore[union-attr]
    assert fs.lstat("/etc/p").kind == "fifo"  # type: ignore[union-attr]
    assert fs.lstat("/etc/absent") is None
    assert fs.lstat("/etc/absent/below") is None
    assert fs.lstat("/opt/x") is None  # allowed root that does not exist yet


def test_read_and_hash(fs: FsRoot, root: Path) -> None:
    (root / "etc" / "f").write_bytes(b"hello")
    assert fs.read_file("/etc/f") == b"hello"
    assert fs.sha256("/etc/f") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert fs.sha256("/etc/none") is None
    assert fs.observe("/etc/f") == (fs.lstat("/etc/f"), fs.sha256("/etc/f"))
    assert fs.observe("/etc/none") == (None, None)
    with pytest.raises(ApplyError, match="no such file"):
        fs.read_file("/etc/none")


def test_read_cap(fs: FsRoot, root: Path) -> None:
    (root / "etc" / "big").write_bytes(b"x" * 1000)
    assert fs.read_file("/etc/big", max_bytes=1000) == b"x" * 1000
    with pytest.raises(ApplyError, match="cap"):
        fs.read_file("/etc/big", max_bytes=999)


def test_reads_refuse_symlinks_fifos_and_dirs(fs: FsRoot, root: Path, outside: Path) -> None:
    os.symlink(outside / "precious", root / "etc" / "l")
    os.mkfifo(root / "etc" / "p")  # opening it for reading would block: must not be opened
    (root / "etc" / "d").mkdir()
    for p in ("/etc/l", "/etc/p", "/etc/d"):
        with pytest.raises(ConfinementError):
            fs.read_file(p)
        with pytest.raises(ConfinementError):
            fs.sha256(p)
    assert fs.observe("/etc/l")[1] is None


# -- confinement ----------------------------------------------------------------------------------

BAD_PATHS = [
    "etc/motd",
    "/etc/../var/keep",
    "/etc/./motd",
    "/etc//motd",
    "/etc/motd/",
    "/etc/mo\x00td",
    "/",
    "",
    "/var/keep",
    "/etcetera/x",
    "/../etc/x",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_are_refused_before_anything_is_touched(fs: FsRoot, root: Path, path: str) -> None:
    before = snapshot(root)
    store = root.parent / "store"
    calls: list[Callable[[], object]] = [
        lambda: fs.write_file(path, b"x", mode=0o644),
        lambda: fs.make_dir(path, mode=0o755),
        lambda: fs.make_symlink(path, "/x"),
        lambda: fs.set_attrs(path, mode=0o777),
        lambda: fs.remove(path),
        lambda: fs.remove_tree(path),
        lambda: fs.lstat(path),
        lambda: fs.read_file(path),
        lambda: fs.sha256(path),
        lambda: fs.capture(path, store),
        lambda: fs.restore({"path": path, "kind": "absent"}, store),
        lambda: fs.host_path(path),
    ]
    for call in calls:
        with pytest.raises(PathError):
            call()
    assert snapshot(root) == before
    assert not store.exists()


@pytest.mark.parametrize("link_target", ["inside", "outside"])
def test_symlinked_parent_is_refused(fs: FsRoot, root: Path, outside: Path, link_target: str) -> None:
    real = root / "etc" / "real"
    real.mkdir()
    os.symlink("real" if link_target == "inside" else str(outside), root / "etc" / "link")
    before = snapshot(root), snapshot(outside)
    calls: list[Callable[[], object]] = [
        lambda: fs.write_file("/etc/link/new", b"x", mode=0o644),
        lambda: fs.write_file("/etc/link/sub/new", b"x", mode=0o644),
        lambda: fs.make_dir("/etc/link/newdir"),
        lambda: fs.make_symlink("/etc/link/newlink", "/x"),
        lambda: fs.remove("/etc/link/precious"),
        lambda: fs.remove_tree("/etc/link/sub"),
        lambda: fs.set_attrs("/etc/link/precious", mode=0o777),
        lambda: fs.lstat("/etc/link/precious"),
        lambda: fs.read_file("/etc/link/precious"),
    ]
    for call in calls:
        with pytest.raises(ConfinementError):
            call()
    assert (snapshot(root), snapshot(outside)) == before


def test_file_as_parent_is_refused(fs: FsRoot, root: Path) -> None:
    (root / "etc" / "f").write_text("x")
    with pytest.raises(ConfinementError):
        fs.write_file("/etc/f/child", b"y", mode=0o644)
    assert (root / "etc" / "f").read_text() == "x"


# -- writing --------------------------------------------------------------------------------------


def test_write_creates_parents_and_sets_attributes(fs: FsRoot, root: Path) -> None:
    fs.write_file("/etc/app/conf.d/main.conf", b"a=1\n", mode=0o640, uid=UID, gid=GID)
    target = root / "etc" / "app" / "conf.d" / "main.conf"
    assert target.read_bytes() == b"a=1\n"
    assert fs.lstat("/etc/app/conf.d/main.conf") == Entry("file", 0o640, UID, GID, 4, None)
    assert stat.S_IMODE((root / "etc" / "app").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "etc" / "app" / "conf.d").stat().st_mode) == 0o755
    assert not [n for n in os.listdir(target.parent) if is_temp_name(n)]


def test_write_replaces_content_and_mode(fs: FsRoot, root: Path) -> None:
    fs.write_file("/etc/motd", b"old", mode=0o644)
    fs.write_file("/etc/motd", b"new content", mode=0o4750)
    assert (root / "etc" / "motd").read_bytes() == b"new content"
    assert stat.S_IMODE((root / "etc" / "motd").stat().st_mode) == 0o4750
    fs.write_file("/etc/motd", b"", mode=0o600)
    assert (root / "etc" / "motd").read_bytes() == b""


def test_write_refuses_bad_mode(fs: FsRoot, root: Path) -> None:
    with pytest.raises(ApplyError):
        fs.write_file("/etc/motd", b"x", mode=0o10000)
    assert not (root / "etc" / "motd").exists()


@pytest.mark.skipif(not IS_ROOT, reason="changing the owner to another user needs root")
def test_write_sets_foreign_owner_and_keeps_it_when_unspecified(fs: FsRoot, root: Path) -> None:
    fs.write_file("/etc/owned", b"x", mode=0o4755, uid=1234, gid=4321)
    st = (root / "etc" / "owned").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o4755)
    fs.write_file("/etc/owned", b"y", mode=0o644)
    st = (root / "etc" / "owned").stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_write_refuses_symlink_dir_and_fifo_at_target(fs: FsRoot, root: Path, outside: Path) -> None:
    os.symlink(outside / "precious", root / "etc" / "l")
    os.symlink("gone", root / "etc" / "dangling")
    (root / "etc" / "d").mkdir()
    os.mkfifo(root / "etc" / "p")
    before = snapshot(root), snapshot(outside)
    for p in ("/etc/l", "/etc/dangling", "/etc/d", "/etc/p"):
        with pytest.raises(ConfinementError):
            fs.write_file(p, b"evil", mode=0o644)
    assert (snapshot(root), snapshot(outside)) == before
    assert not (root / "etc" / "gone").exists()


def test_make_dir(fs: FsRoot, root: Path) -> None:
    fs.make_dir("/opt/a/b", mode=0o750, uid=UID, gid=GID)
    assert stat.S_IMODE((root / "opt" / "a" / "b").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "opt" / "a").stat().st_mode) == 0o755
    fs.make_dir("/opt/a/b", mode=0o700)
    assert stat.S_IMODE((root / "opt" / "a" / "b").stat().st_mode) == 0o700
    fs.make_dir("/opt/a/b")  # no attributes: left as they are
    assert stat.S_IMODE((root / "opt" / "a" / "b").stat().st_mode) == 0o700
    fs.make_dir("/opt/c")
    assert stat.S_IMODE((root / "opt" / "c").stat().st_mode) == 0o755
    (root / "opt" / "f").write_text("x")
    os.symlink("c", root / "opt" / "l")
    for p in ("/opt/f", "/opt/l"):
        with pytest.raises(ConfinementError):
            fs.make_dir(p, mode=0o755)
    assert (root / "opt" / "f").read_text() == "x"
    assert (root / "opt" / "l").is_symlink()


def test_set_attrs_never_follows_symlinks(fs: FsRoot, root: Path, outside: Path) -> None:
    os.chmod(outside / "precious", 0o600)
    os.symlink(outside / "precious", root / "etc" / "l")
    fs.set_attrs("/etc/l", mode=0o777, uid=UID, gid=GID)
    assert stat.S_IMODE((outside / "precious").stat().st_mode) == 0o600
    (root / "etc" / "f").write_text("x")
    fs.set_attrs("/etc/f", mode=0o2711)
    assert stat.S_IMODE((root / "etc" / "f").stat().st_mode) == 0o2711
    (root / "etc" / "d").mkdir()
    fs.set_attrs("/etc/d", mode=0o1777)
    assert stat.S_IMODE((root / "etc" / "d").stat().st_mode) == 0o1777
    os.mkfifo(root / "etc" / "p")
    with pytest.raises(ConfinementError):
        fs.set_attrs("/etc/p", mode=0o600)
    with pytest.raises(ApplyError):
        fs.set_attrs("/etc/none", mode=0o600)


def test_set_attrs_refuses_hard_links(fs: FsRoot, root: Path, outside: Path) -> None:
    os.chmod(outside / "precious", 0o600)
    try:
        os.link(outside / "precious", root / "etc" / "hard")
    except OSError as exc:  # tmp dirs on different file systems: nothing to test
        pytest.skip(f"cannot hard-link here: {exc}")
    with pytest.raises(ConfinementError, match="hard links"):
        fs.set_attrs("/etc/hard", mode=0o666)
    assert stat.S_IMODE((outside / "precious").stat().st_mode) == 0o600
    fs.write_file("/etc/hard", b"own inode now", mode=0o644)
    assert (outside / "precious").read_text() == "must survive"
    fs.set_attrs("/etc/hard", mode=0o640)


def test_set_attrs_on_unreadable_file(fs: FsRoot, root: Path) -> None:
    (root / "etc" / "locked").write_text("x")
    os.chmod(root / "etc" / "locked", 0)
    fs.set_attrs("/etc/locked", mode=0o640)
    assert stat.S_IMODE((root / "etc" / "locked").stat().st_mode) == 0o640


def test_make_symlink(fs: FsRoot, root: Path) -> None:
    fs.make_symlink("/etc/alt/current", "/opt/v1")
    assert os.readlink(root / "etc" / "alt" / "current") == "/opt/v1"
    fs.make_symlink("/etc/alt/current", "/opt/v2")
    assert os.readlink(root / "etc" / "alt" / "current") == "/opt/v2"
    fs.make_symlink("/etc/alt/current", "/opt/v2")
    (root / "etc" / "file").write_text("x")
    fs.make_symlink("/etc/file", "alt")
    assert os.readlink(root / "etc" / "file") == "alt"
    (root / "etc" / "d").mkdir()
    os.mkfifo(root / "etc" / "p")
    for p in ("/etc/d", "/etc/p"):
        with pytest.raises(ConfinementError):
            fs.make_symlink(p, "/x")
    with pytest.raises(ApplyError):
        fs.make_symlink("/etc/bad", "")
    assert not [n for n in os.listdir(root / "etc") if is_temp_name(n)]


# -- removing -------------------------------------------------------------------------------------


def test_remove(fs: FsRoot, root: Path, outside: Path) -> None:
    (root / "etc" / "f").write_text("x")
    (root / "etc" / "empty").mkdir()
    (root / "etc" / "full").mkdir()
    (root / "etc" / "full" / "x").write_text("x")
    os.symlink(outside, root / "etc" / "l")
    for p in ("/etc/f", "/etc/empty", "/etc/l", "/etc/absent", "/etc/absent/deeper"):
        fs.remove(p)
    assert sorted(os.listdir(root / "etc")) == ["full"]
    with pytest.raises(ApplyError, match="/etc/full"):
        fs.remove("/etc/full")
    assert (root / "etc" / "full" / "x").exists()
    assert (outside / "precious").read_text() == "must survive"


def test_remove_tree_never_follows_symlinks(fs: FsRoot, root: Path, outside: Path) -> None:
    tree = root / "etc" / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "top").write_text("y")
    os.symlink(outside, tree / "a" / "to_outside")
    os.symlink(outside / "sub", tree / "to_sub")
    os.mkfifo(tree / "a" / "p")
    os.chmod(tree / "a" / "b", 0o500)
    before = snapshot(outside)
    fs.remove_tree("/etc/tree")
    assert not tree.exists()
    assert snapshot(outside) == before
    os.symlink(outside, root / "etc" / "l")
    fs.remove_tree("/etc/l")
    assert not (root / "etc" / "l").is_symlink()
    assert snapshot(outside) == before
    fs.remove_tree("/etc/absent")


# -- capture / restore ----------------------------------------------------------------------------


def roundtrip(fs: FsRoot, path: str, store: Path, *, recursive: bool = False) -> dict[str, object]:
    rec = fs.capture(path, store, recursive=recursive)
    return json.loads(json.dumps(rec))  # type: ignore[no-any-return]


def test_capture_restore_absent(fs: FsRoot, root: Path, store: Path) -> None:
    rec = roundtrip(fs, "/etc/new", store)
    assert rec["kind"] == "absent"
    (root / "etc" / "new" / "x").mkdir(parents=True)
    fs.restore(rec, store)
    fs.restore(rec, store)
    assert not (root / "etc" / "new").exists()
    assert roundtrip(fs, "/opt/deep/x", store)["kind"] == "absent"


def test_capture_restore_file(fs: FsRoot, root: Path, store: Path) -> None:
    fs.write_file("/etc/motd", b"original", mode=0o4640)
    rec = roundtrip(fs, "/etc/motd", store)
    assert rec["kind"] == "file"
    assert rec["mode"] == 0o4640
    assert (rec["uid"], rec["gid"]) == (UID, GID)
    assert rec["blob"] == fs.sha256("/etc/motd")  # unkeyed store: plain SHA-256 names
    assert (store / str(rec["blob"])).read_bytes() == b"original"
    before = snapshot(root)
    fs.write_file("/etc/motd", b"changed", mode=0o600)
    fs.restore(rec, store)
    assert snapshot(root) == before
    fs.remove("/etc/motd")
    fs.restore(rec, store)
    fs.restore(rec, store)
    assert snapshot(root) == before
    (root / "etc" / "motd").unlink()
    (root / "etc" / "motd").mkdir()
    (root / "etc" / "motd" / "inner").write_text("z")
    fs.restore(rec, store)
    assert snapshot(root) == before


def test_capture_restore_symlink_and_dir(fs: FsRoot, root: Path, store: Path) -> None:
    os.symlink("/opt/target", root / "etc" / "l")
    (root / "etc" / "d").mkdir(mode=0o700)
    os.chmod(root / "etc" / "d", 0o2750)
    recs = [roundtrip(fs, "/etc/l", store), roundtrip(fs, "/etc/d", store)]
    assert [r["kind"] for r in recs] == ["symlink", "dir"]
    assert recs[0]["target"] == "/opt/target"
    assert recs[1]["children"] is None
    before = snapshot(root)
    os.unlink(root / "etc" / "l")
    (root / "etc" / "l").write_text("now a file")
    os.chmod(root / "etc" / "d", 0o755)
    (root / "etc" / "d" / "added").write_text("kept: not recursive")
    for r in recs:
        fs.restore(r, store)
    assert snapshot(root)["etc/l"] == before["etc/l"]
    assert snapshot(root)["etc/d"] == before["etc/d"]
    assert (root / "etc" / "d" / "added").exists()


def test_capture_restore_recursive_tree(fs: FsRoot, root: Path, store: Path, outside: Path) -> None:
    fs.write_file("/opt/app/bin/run", b"#!/bin/sh\n", mode=0o755)
    fs.write_file("/opt/app/etc/a.conf", b"same", mode=0o644)
    fs.write_file("/opt/app/etc/b.conf", b"same", mode=0o600)
    fs.make_dir("/opt/app/empty", mode=0o700)
    fs.make_symlink("/opt/app/current", "bin")
    os.chmod(root / "opt" / "app" / "etc", 0o550)
    rec = roundtrip(fs, "/opt/app", store, recursive=True)
    assert len(os.listdir(store)) == 2  # "same" is stored once
    assert len(referenced_blobs([rec])) == 2
    before = snapshot(root)

    os.chmod(root / "opt" / "app" / "etc", 0o755)
    (root / "opt" / "app" / "etc" / "a.conf").write_text("changed")
    (root / "opt" / "app" / "etc" / "c.conf").write_text("added")
    (root / "opt" / "app" / "bin" / "run").unlink()
    (root / "opt" / "app" / "bin" / "run").mkdir()
    os.rmdir(root / "opt" / "app" / "empty")
    (root / "opt" / "app" / "empty").write_text("file now")
    os.unlink(root / "opt" / "app" / "current")
    os.symlink(outside, root / "opt" / "app" / "current")
    os.symlink(outside, root / "opt" / "app" / "sneaky")
    outside_before = snapshot(outside)

    fs.restore(rec, store)
    assert snapshot(root) == before
    fs.restore(rec, store)
    assert snapshot(root) == before
    assert snapshot(outside) == outside_before

    fs.remove_tree("/opt/app")
    fs.restore(rec, store)
    assert snapshot(root) == before


def test_capture_refuses_special_files(fs: FsRoot, root: Path, store: Path) -> None:
    (root / "etc" / "d").mkdir()
    os.mkfifo(root / "etc" / "d" / "p")
    with pytest.raises(ConfinementError):
        fs.capture("/etc/d/p", store)
    with pytest.raises(ConfinementError):
        fs.capture("/etc/d", store, recursive=True)
    assert fs.capture("/etc/d", store)["kind"] == "dir"


def test_restore_detects_bad_records_and_corrupt_blobs(fs: FsRoot, root: Path, store: Path) -> None:
    fs.write_file("/etc/motd", b"original", mode=0o644)
    rec = fs.capture("/etc/motd", store)
    fs.write_file("/etc/motd", b"current", mode=0o644)
    blob = store / rec["blob"]
    os.chmod(blob, 0o600)
    blob.write_bytes(b"tampered")
    with pytest.raises(ApplyError, match="corrupted"):
        fs.restore(rec, store)
    blob.unlink()
    with pytest.raises(ApplyError, match="unreadable"):
        fs.restore(rec, store)
    for bad in (
        {**rec, "kind": "fifo"},
        {**rec, "mode": "0644"},
        {**rec, "blob": "../../etc/passwd"},
        {"kind": "file"},
    ):
        with pytest.raises(ApplyError):
            fs.restore(bad, store)
    with pytest.raises(ConfinementError):
        fs.restore({**rec, "path": "/var/keep"}, store)
    assert (root / "etc" / "motd").read_bytes() == b"current"


# -- atomicity ------------------------------------------------------------------------------------


def test_reader_never_sees_a_partial_file(fs: FsRoot, root: Path) -> None:
    old, new = b"A" * (1 << 20), b"B" * (1 << 20)
    fs.write_file("/etc/big", old, mode=0o644)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(40):
                if stop.is_set():
                    return
                fs.write_file("/etc/big", new if i % 2 == 0 else old, mode=0o644)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    seen: set[bytes] = set()
    reads = 0
    deadline = time.monotonic() + 20
    try:
        while not stop.is_set() and time.monotonic() < deadline and reads < 10_000:
            data = (root / "etc" / "big").read_bytes()
            assert data in (old, new), f"partial read of {len(data)} bytes"
            seen.add(data[:1])
            reads += 1
    finally:
        stop.set()
        t.join(timeout=30)
    assert not errors
    assert reads > 0


_KILL_SCRIPT = r"""
import sys
from pathlib import Path
from edge_agent.fsafe import FsRoot

fs = FsRoot(Path(sys.argv[1]), ("/etc",))
print("ready", flush=True)
for i in range(100_000):
    body = bytes([65 + i % 26]) * (64 * 1024 + i % 7)
    fs.write_file(f"/etc/many/f{i % 25}", len(body).to_bytes(4, "big") + body, mode=0o644)
"""


def test_sigkill_mid_writes_leaves_no_partial_targets(fs: FsRoot, root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(root)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 10
        many = root / "etc" / "many"
        while time.monotonic() < deadline and len(list(many.glob("f*")) if many.exists() else []) < 25:
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    targets = sorted(many.glob("f*"))
    assert len(targets) == 25
    for t in targets:
        data = t.read_bytes()
        size = int.from_bytes(data[:4], "big")
        body = data[4:]
        assert len(body) == size, f"{t.name} is partial"
        assert body == body[:1] * size
    leftovers = [n for n in os.listdir(many) if n.startswith(TEMP_PREFIX)]
    assert fs.clean_temp_files("/etc/many") == len(leftovers)
    assert not [n for n in os.listdir(many) if n.startswith(TEMP_PREFIX)]
    assert len(list(many.glob("f*"))) == 25


def test_clean_temp_files_touches_only_temp_names(fs: FsRoot, root: Path) -> None:
    (root / "etc" / f"{TEMP_PREFIX}abc").write_text("x")
    os.symlink("/x", root / "etc" / f"{TEMP_PREFIX}def")
    (root / "etc" / f"{TEMP_PREFIX}dir" / "half").mkdir(parents=True)  # a directory being built
    (root / "etc" / "keep").write_text("y")
    (root / "etc" / "keepdir").mkdir()
    assert fs.clean_temp_files("/etc") == 3
    assert sorted(os.listdir(root / "etc")) == ["keep", "keepdir"]
    assert fs.clean_temp_files("/etc/absent") == 0
    with pytest.raises(ConfinementError):
        fs.clean_temp_files("/etc/keep")


def test_fsync_dir(fs: FsRoot, root: Path) -> None:
    fs.fsync_dir("/etc")
    (root / "etc" / "f").write_text("x")
    with pytest.raises(ConfinementError):
        fs.fsync_dir("/etc/f")
    with pytest.raises(ApplyError):
        fs.fsync_dir("/etc/none")


def test_keyed_blob_names_hide_the_content_hash(root: Path, store: Path) -> None:
    key = b"k" * 32
    with FsRoot(root, ("/etc",), blob_key=key) as keyed:
        keyed.write_file("/etc/psk", b"1234", mode=0o600)
        rec = keyed.capture("/etc/psk", store)
        assert rec["blob"] != keyed.sha256("/etc/psk")
        assert rec["blob"] == hmac.new(key, b"1234", hashlib.sha256).hexdigest()
        assert "sha256" not in rec
        keyed.write_file("/etc/psk", b"changed", mode=0o644)
        keyed.restore(rec, store)
        assert (root / "etc/psk").read_bytes() == b"1234"
    with FsRoot(root, ("/etc",), blob_key=b"other key") as other, pytest.raises(ApplyError):
        other.restore(rec, store)  # a blob is verified under the key that named it


def test_denied_roots_inside_allowed_ones(root: Path) -> None:
    with FsRoot(root, ("/etc",), denied_roots=("/etc/edge-agent",)) as fs:
        fs.write_file("/etc/ok", b"x", mode=0o644)
        for path in ("/etc/edge-agent", "/etc/edge-agent/agent.yaml"):
            with pytest.raises(ConfinementError):
                fs.write_file(path, b"y", mode=0o644)
        assert not (root / "etc/edge-agent").exists()


def test_new_directories_appear_whole_with_their_mode(fs: FsRoot, root: Path) -> None:
    fs.make_dir("/etc/a/b", mode=0o750)
    assert stat.S_IMODE((root / "etc/a").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "etc/a/b").stat().st_mode) == 0o750
    assert not [n for n in os.listdir(root / "etc/a") if n.startswith(TEMP_PREFIX)]
    fs.make_dir("/etc/a/b", mode=0o700)  # an existing one only changes what is asked
    assert stat.S_IMODE((root / "etc/a/b").stat().st_mode) == 0o700


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_observing_opens_each_directory_once_and_closes_them(root: Path, fs: FsRoot) -> None:
    (root / "etc" / "app").mkdir()
    for name in ("a", "b", "c"):
        (root / "etc" / "app" / name).write_text(name)
    before = _open_fds()
    with fs.observing():
        seen = [fs.observe(f"/etc/app/{name}")[1] for name in ("a", "b", "c")]
        assert _open_fds() == before + 1  # /etc/app, walked once and kept
        with pytest.raises(ApplyError, match="already active"), fs.observing():
            pass
    assert _open_fds() == before
    assert seen == [hashlib.sha256(n.encode()).hexdigest() for n in ("a", "b", "c")]


def test_a_write_inside_observing_walks_afresh_and_refuses_a_swapped_symlink(
        root: Path, outside: Path, fs: FsRoot) -> None:
    app = root / "etc" / "app"
    app.mkdir()
    (app / "a").write_text("a")
    with fs.observing():
        assert fs.observe("/etc/app/a")[0] is not None  # /etc/app is now cached
        app.rename(root / "etc" / "app.old")
        app.symlink_to(outside)
        with pytest.raises(ConfinementError):
            fs.write_file("/etc/app/precious", b"overwritten", mode=0o644)
        # a read through the cached directory sees the directory that was walked, not the link
        assert fs.observe("/etc/app/a")[1] == hashlib.sha256(b"a").hexdigest()
    assert (outside / "precious").read_text() == "must survive"
    with pytest.raises(ConfinementError):  # outside the block every walk starts from the root
        fs.observe("/etc/app/precious")
