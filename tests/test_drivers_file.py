"""File-kind drivers on real files in a tmp device root: plans, diffs, refusals, secrets, speed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from edge_agent.drivers import Context, get_driver
from edge_agent.drivers.base import REDACTED, Change
from edge_agent.drivers.file import DIFF_MAX_LINES
from edge_agent.drivers.secret_file import expected_secret_id
from edge_agent.errors import ApplyError
from edge_agent.state import Managed
from edge_core.errors import ConfinementError, SecretIntegrityError
from edge_core.resources import Absent, Directory, File, Resource, SecretFile, Symlink
from edge_core.trust.sealed import open_sealed, seal
from tests.support.fake_system import make_context, tree_state


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "device"
    (r / "etc").mkdir(parents=True)
    return r


@pytest.fixture
def ctxs() -> Iterator[list[Context]]:
    made: list[Context] = []
    yield made
    for c in made:
        c.fs.close()


def ctx_for(root: Path, ctxs: list[Context], payloads: dict[str, bytes] | None = None,
            **kw: object) -> Context:
    c = make_context(root, payloads, **kw)  # type: ignore[arg-type]
    ctxs.append(c)
    return c


def plan(res: Resource, ctx: Context) -> list[Change]:
    d = get_driver(res.kind)
    return d.plan(res, d.observe(res, ctx), ctx)


def apply(changes: list[Change], ctx: Context) -> None:
    for c in changes:
        d = get_driver(c.kind)
        d.snapshot(c, ctx)
        d.apply(c, ctx)


def motd(content: str = "hello\n", **kw: object) -> File:
    return File(id="motd", bundle="b", path="/etc/motd", content=content, **kw)  # type: ignore[arg-type]


def test_create_update_noop_and_remove_a_file(root: Path, ctxs: list[Context]) -> None:
    ctx = ctx_for(root, ctxs, {"motd": b"hello\n"})
    [create] = plan(motd(), ctx)
    assert create.action == "create"
    assert "+hello" in create.diff
    assert "mode 0644" in create.summary
    apply([create], ctx)
    assert (root / "etc/motd").read_bytes() == b"hello\n"
    assert (root / "etc/motd").stat().st_mode & 0o7777 == 0o644
    assert plan(motd(), ctx) == []

    (root / "etc/motd").chmod(0o600)  # undeclared mode is left alone on an existing file
    ctx2 = ctx_for(root, ctxs, {"motd": b"hello\nworld\n"})
    [update] = plan(motd("hello\nworld\n"), ctx2)
    assert update.action == "update"
    assert "+world" in update.diff
    assert update.diff.startswith("--- a/etc/motd\n+++ b/etc/motd\n")
    apply([update], ctx2)
    assert (root / "etc/motd").read_text() == "hello\nworld\n"
    assert (root / "etc/motd").stat().st_mode & 0o7777 == 0o600

    managed = Managed("motd", "file", {"path": "/etc/motd"}, "x",
                      {"path": "/etc/motd", "kind": "absent"}, 0.0)
    [delete] = get_driver("file").prune(managed, ctx2)
    assert delete.action == "delete"
    apply([delete], ctx2)
    assert not (root / "etc/motd").exists()
    assert get_driver("file").prune(managed, ctx2) == []


def test_attrs_only_change(root: Path, ctxs: list[Context]) -> None:
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/motd").chmod(0o666)
    ctx = ctx_for(root, ctxs, {"motd": b"hello\n"})
    [change] = plan(motd(mode=0o640), ctx)
    assert change.action == "attrs"
    assert "mode 0666 -> 0640" in change.summary
    assert change.data["found"].endswith(f"uid {os.getuid()} gid {os.getgid()}")
    apply([change], ctx)
    assert (root / "etc/motd").stat().st_mode & 0o7777 == 0o640
    assert plan(motd(mode=0o640), ctx) == []


def test_binary_and_long_diffs(root: Path, ctxs: list[Context]) -> None:
    (root / "etc/motd").write_bytes(b"\x00\x01old")
    ctx = ctx_for(root, ctxs, {"motd": b"\x00\x02new-bytes"})
    [change] = plan(motd(), ctx)
    assert change.diff == "binary content differs (11 bytes)"

    (root / "etc/motd").write_text("".join(f"old {i}\n" for i in range(300)))
    ctx = ctx_for(root, ctxs, {"motd": "".join(f"new {i}\n" for i in range(300)).encode()})
    [change] = plan(motd(), ctx)
    lines = change.diff.splitlines()
    assert len(lines) == DIFF_MAX_LINES + 1
    assert lines[-1].startswith("... (")
    assert "more diff lines" in lines[-1]


def test_unknown_owner_is_planned_and_fails_at_apply(root: Path, ctxs: list[Context]) -> None:
    ctx = ctx_for(root, ctxs, {"motd": b"hello\n"})
    [change] = plan(motd(owner="no-such-user-ef"), ctx)
    assert "owner 'no-such-user-ef' unknown on this device" in change.summary
    with pytest.raises(ApplyError, match="no-such-user-ef"):
        get_driver("file").apply(change, ctx)
    assert not (root / "etc/motd").exists()


def test_numeric_owner_of_self_is_in_sync(root: Path, ctxs: list[Context]) -> None:
    (root / "etc/motd").write_text("hello\n")
    ctx = ctx_for(root, ctxs, {"motd": b"hello\n"})
    assert plan(motd(owner=str(os.getuid()), group=str(os.getgid())), ctx) == []


def test_symlinked_parent_is_refused_before_anything_is_written(tmp_path: Path, root: Path,
                                                                 ctxs: list[Context]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc/app").symlink_to(outside)
    ctx = ctx_for(root, ctxs, {"f": b"x"})
    res = File(id="f", bundle="b", path="/etc/app/conf", content="x")
    with pytest.raises(ConfinementError):
        plan(res, ctx)
    forged = Change("f", "file", "create", "create", paths=("/etc/app/conf",),
                    data={"path": "/etc/app/conf", "mode": 0o644, "uid": None, "gid": None})
    with pytest.raises(ConfinementError):
        get_driver("file").apply(forged, ctx)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("make", ["fifo", "dir", "symlink"])
def test_non_regular_targets_are_refused(make: str, root: Path, ctxs: list[Context]) -> None:
    target = root / "etc/motd"
    if make == "fifo":
        os.mkfifo(target)
    elif make == "dir":
        target.mkdir()
    else:
        target.symlink_to("/etc/passwd")
    ctx = ctx_for(root, ctxs, {"motd": b"x"})
    with pytest.raises(ConfinementError):
        plan(motd(), ctx)


def test_path_outside_allowed_roots_is_refused(root: Path, ctxs: list[Context]) -> None:
    ctx = ctx_for(root, ctxs, {"motd": b"x"}, allowed_roots=("/opt",))
    with pytest.raises(ConfinementError):
        plan(motd(), ctx)


def test_missing_parents_are_created_and_undone(root: Path, ctxs: list[Context]) -> None:
    before = tree_state(root)
    ctx = ctx_for(root, ctxs, {"f": b"x\n"})
    res = File(id="f", bundle="b", path="/srv/app/conf/app.ini", content="x\n")
    [change] = plan(res, ctx)
    assert change.paths == ("/srv", "/srv/app", "/srv/app/conf", "/srv/app/conf/app.ini")
    d = get_driver("file")
    records = d.snapshot(change, ctx)
    d.apply(change, ctx)
    assert (root / "srv/app/conf/app.ini").read_text() == "x\n"
    assert d.original_of(res, records) == records[-1]
    for r in reversed(records):
        d.undo(r, ctx)
    assert tree_state(root) == before


def test_prune_restores_a_file_that_existed_before(root: Path, ctxs: list[Context]) -> None:
    (root / "etc/motd").write_text("original\n")
    ctx = ctx_for(root, ctxs, {"motd": b"managed\n"})
    d = get_driver("file")
    [change] = plan(motd("managed\n"), ctx)
    records = d.snapshot(change, ctx)
    d.apply(change, ctx)
    managed = Managed("motd", "file", d.spec_of(motd("managed\n"), ctx)[0], "x",
                      d.original_of(motd(), records), 0.0)
    [restore] = d.prune(managed, ctx)
    assert restore.action == "restore"
    apply([restore], ctx)
    assert (root / "etc/motd").read_text() == "original\n"
    unknown = Managed("motd", "file", {"path": "/etc/motd"}, "x", None, 0.0)
    assert d.prune(unknown, ctx) == []  # no record of the past: leave it


def test_directory_create_attrs_and_prune_leaves_non_empty(root: Path, ctxs: list[Context]) -> None:
    ctx = ctx_for(root, ctxs)
    res = Directory(id="d", bundle="b", path="/srv/data", mode=0o750)
    [create] = plan(res, ctx)
    assert create.action == "create"
    apply([create], ctx)
    assert (root / "srv/data").stat().st_mode & 0o7777 == 0o750
    assert plan(res, ctx) == []
    (root / "srv/data").chmod(0o777)
    [attrs] = plan(res, ctx)
    assert attrs.action == "attrs"
    apply([attrs], ctx)
    assert (root / "srv/data").stat().st_mode & 0o7777 == 0o750
    (root / "srv/data/user-file").write_text("keep me")
    created = {"path": "/srv/data", "kind": "absent"}
    managed = Managed("d", "directory", {"path": "/srv/data"}, "x", created, 0.0)
    apply(get_driver("directory").prune(managed, ctx), ctx)
    assert (root / "srv/data/user-file").read_text() == "keep me"
    (root / "srv/data/user-file").unlink()
    apply(get_driver("directory").prune(managed, ctx), ctx)
    assert not (root / "srv/data").exists()
    (root / "etc/plain").write_text("x")
    with pytest.raises(ConfinementError):
        plan(Directory(id="p", bundle="b", path="/etc/plain"), ctx)


def test_symlink_create_retarget_and_replace_file(root: Path, ctxs: list[Context]) -> None:
    ctx = ctx_for(root, ctxs)
    res = Symlink(id="l", bundle="b", path="/etc/alt", target="/opt/a")
    [create] = plan(res, ctx)
    apply([create], ctx)
    assert os.readlink(root / "etc/alt") == "/opt/a"
    assert plan(res, ctx) == []
    [retarget] = plan(Symlink(id="l", bundle="b", path="/etc/alt", target="/opt/b"), ctx)
    assert retarget.action == "update"
    assert "/opt/a -> /opt/b" in retarget.summary
    (root / "etc/alt").unlink()
    (root / "etc/alt").write_text("file")
    [replace] = plan(res, ctx)
    assert "replace regular file" in replace.summary
    apply([replace], ctx)
    assert os.readlink(root / "etc/alt") == "/opt/a"


def test_absent_removes_a_tree_and_undo_brings_it_back(root: Path, ctxs: list[Context]) -> None:
    (root / "etc/junk/deep").mkdir(parents=True)
    (root / "etc/junk/deep/f").write_text("f")
    (root / "etc/junk/l").symlink_to("/etc/passwd")
    before = tree_state(root)
    ctx = ctx_for(root, ctxs)
    res = Absent(id="a", bundle="b", path="/etc/junk")
    [delete] = plan(res, ctx)
    assert delete.summary == "delete directory tree /etc/junk"
    d = get_driver("absent")
    records = d.snapshot(delete, ctx)
    d.apply(delete, ctx)
    assert not (root / "etc/junk").exists()
    assert plan(res, ctx) == []
    for r in records:
        d.undo(r, ctx)
    assert tree_state(root) == before


def test_absent_refuses_a_fifo(root: Path, ctxs: list[Context]) -> None:
    os.mkfifo(root / "etc/pipe")
    ctx = ctx_for(root, ctxs)
    [delete] = plan(Absent(id="a", bundle="b", path="/etc/pipe"), ctx)
    with pytest.raises(ConfinementError):
        get_driver("absent").snapshot(delete, ctx)


PLAINTEXT = b"correct-horse-battery-staple-9f3a"


def _secret_ctx(root: Path, ctxs: list[Context], key: PrivateKey, document: bytes) -> Context:
    def opener(res: SecretFile, doc: bytes) -> bytes:
        return open_sealed(doc, expected_id=expected_secret_id(res), key=key)

    return ctx_for(root, ctxs, {"psk": document}, open_secret=opener)


def test_secret_plaintext_never_leaves_the_file(root: Path, ctxs: list[Context]) -> None:
    key = PrivateKey.generate()
    doc = seal(PLAINTEXT, secret_id="wifi-psk", version=1, recipients=[key.public_key])
    ctx = _secret_ctx(root, ctxs, key, doc)
    res = SecretFile(id="psk", bundle="b", path="/etc/wifi.psk", secret="secrets/wifi-psk.sealed.json")
    d = get_driver("secret_file")
    [create] = plan(res, ctx)
    assert create.diff == REDACTED
    (root / "etc/wifi.psk").write_bytes(b"old-value")
    [update] = plan(res, ctx)
    spec, _ = d.spec_of(res, ctx)
    for change in (create, update):
        text = repr(change) + json.dumps(dict(change.data)) + change.summary + change.diff
        assert PLAINTEXT.decode() not in text
        assert PLAINTEXT.hex() not in text
    assert PLAINTEXT.decode() not in json.dumps(spec)
    records = d.snapshot(update, ctx)
    d.apply(update, ctx)
    assert (root / "etc/wifi.psk").read_bytes() == PLAINTEXT
    assert (root / "etc/wifi.psk").stat().st_mode & 0o7777 == 0o600
    assert plan(res, ctx) == []
    for r in records:
        d.undo(r, ctx)
    assert (root / "etc/wifi.psk").read_bytes() == b"old-value"


def test_secret_under_another_name_is_refused(root: Path, ctxs: list[Context]) -> None:
    key = PrivateKey.generate()
    doc = seal(PLAINTEXT, secret_id="db-password", version=1, recipients=[key.public_key])
    ctx = _secret_ctx(root, ctxs, key, doc)
    res = SecretFile(id="psk", bundle="b", path="/etc/wifi.psk", secret="secrets/wifi-psk.sealed.json")
    with pytest.raises(SecretIntegrityError):
        plan(res, ctx)
    assert not (root / "etc/wifi.psk").exists()


def test_five_hundred_unchanged_files_plan_fast(root: Path, ctxs: list[Context]) -> None:
    payloads = {}
    resources = []
    for i in range(500):
        data = f"line {i}\n".encode() * 20
        (root / f"etc/f{i}.conf").write_bytes(data)
        payloads[f"f{i}"] = data
        resources.append(File(id=f"f{i}", bundle="b", path=f"/etc/f{i}.conf", content=data.decode()))
    ctx = ctx_for(root, ctxs, payloads)
    d = get_driver("file")
    started = time.perf_counter()
    observed = [d.observe(r, ctx) for r in resources]
    mid = time.perf_counter()
    plans = [d.plan(r, o, ctx) for r, o in zip(resources, observed, strict=True)]
    done = time.perf_counter()
    assert all(p == [] for p in plans)
    assert all(o.content is None for o in observed)  # nothing re-read when digests match
    assert done - mid < 0.05, f"planning 500 unchanged files took {done - mid:.3f}s"
    assert mid - started < 2.0
