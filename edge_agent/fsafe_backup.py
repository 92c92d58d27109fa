"""The backup store: capture records of device paths and the content-addressed blobs behind them.

:meth:`edge_agent.fsafe.FsRoot.capture` records the state of one path (absent, file, directory,
symlink; optionally a whole tree) as a JSON-able record whose file contents are copied into a
blob store, one blob per content, named by its SHA-256 (or HMAC-SHA256 under a device-local key)
and fsync'd before the record is returned. :func:`restore` puts a recorded path back through the
confined operations of :class:`~edge_agent.fsafe.FsRoot`, checking every blob against its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from edge_agent.errors import ApplyError
from edge_agent.fsafe_fd import (
    CHUNK,
    DIR_FLAGS,
    READ_FLAGS,
    TEMP_FLAGS,
    check_mode,
    kind_of,
    lstat_at,
    temp_name,
    write_all,
)
from edge_core.errors import ConfinementError

if TYPE_CHECKING:
    from edge_agent.fsafe import FsRoot

__all__ = ["RECORD_KINDS", "absent_record", "capture_at", "referenced_blobs", "restore"]

RECORD_KINDS = ("absent", "file", "dir", "symlink")
"""The kinds a capture record may have."""


def referenced_blobs(records: list[dict[str, Any]]) -> set[str]:
    """Return the blob names used by capture records (and their children), for store clean-up."""
    found: set[str] = set()
    stack = list(records)
    while stack:
        rec = stack.pop()
        blob = rec.get("blob")
        if isinstance(blob, str):
            found.add(blob)
        children = rec.get("children")
        if isinstance(children, list):
            stack.extend(children)
    return found


def absent_record(path: str) -> dict[str, Any]:
    """Return the capture record of a path where nothing exists."""
    return {
        "path": path,
        "kind": "absent",
        "mode": None,
        "uid": None,
        "gid": None,
        "target": None,
        "blob": None,
        "children": None,
    }


class _Store(NamedTuple):
    fd: int
    key: bytes | None


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def _blob_hasher(key: bytes | None) -> _Hasher:
    return hashlib.sha256() if key is None else hmac.new(key, digestmod=hashlib.sha256)


def capture_at(
    pfd: int, name: str, path: str, store: Path, *, key: bytes | None, recursive: bool
) -> dict[str, Any]:
    """Record entry ``name`` of directory ``pfd`` (device path ``path``), its file contents copied
    into the blob store directory ``store`` (created 0700 if missing).

    Raises:
        ConfinementError: a special file (FIFO, socket, device) at or below ``path``, or a file
            replaced while it was copied.
        ApplyError: the store cannot be opened.
        OSError: the OS refused (the caller translates it).
    """
    store_fd = _open_store(store)
    try:
        return _capture_at(pfd, name, path, _Store(store_fd, key), recursive)
    finally:
        os.close(store_fd)


def _capture_at(pfd: int, name: str, path: str, store: _Store, recursive: bool) -> dict[str, Any]:
    st = lstat_at(pfd, name)
    if st is None:
        return absent_record(path)
    rec = absent_record(path)
    rec.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        rec.update(kind="symlink", target=os.readlink(name, dir_fd=pfd))
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, READ_FLAGS, dir_fd=pfd)
        try:
            fst = os.fstat(fd)
            if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
                raise ConfinementError(f"{path} was replaced while being backed up")
            digest = _store_blob(store, fd)
        finally:
            os.close(fd)
        rec.update(kind="file", blob=digest)
    elif stat.S_ISDIR(st.st_mode):
        rec["kind"] = "dir"
        if recursive:
            dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                rec["children"] = [
                    _capture_at(dfd, child, f"{path}/{child}", store, True)
                    for child in sorted(os.listdir(dfd))
                ]
            finally:
                os.close(dfd)
    else:
        raise ConfinementError(f"refusing to back up {path}: it is a {kind_of(st.st_mode)}")
    return rec


def _open_store(store: Path) -> int:
    try:
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(store, DIR_FLAGS)
    except OSError as exc:
        raise ApplyError(f"cannot open the backup store {store}: {exc.strerror}") from exc


def _store_blob(store: _Store, src_fd: int) -> str:
    """Copy ``src_fd`` into the store under its (keyed) digest, once per content, fsync'd; return it."""
    store_fd = store.fd
    tmp = temp_name()
    out = os.open(tmp, TEMP_FLAGS, 0o600, dir_fd=store_fd)
    digest = _blob_hasher(store.key)
    try:
        try:
            while chunk := os.read(src_fd, CHUNK):
                digest.update(chunk)
                write_all(out, chunk)
            hexd = digest.hexdigest()
            if lstat_at(store_fd, hexd) is not None:
                os.unlink(tmp, dir_fd=store_fd)
                return hexd
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, hexd, src_dir_fd=store_fd, dst_dir_fd=store_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=store_fd)
        raise
    os.fsync(store_fd)
    return hexd


def restore(fs: FsRoot, record: dict[str, Any], store: Path, *, key: bytes | None) -> None:
    """Put the path of ``record`` back exactly as recorded through ``fs``; doing it twice is harmless.

    ``absent`` removes whatever is there now (recursively, without following symlinks); a
    recursive directory record also removes entries that were not there at capture time.

    Raises:
        PathError, ConfinementError: bad path in the record, outside the roots, a symlinked parent.
        ApplyError: a malformed record, a missing or corrupted blob, or the OS refused.
    """
    kind = record.get("kind")
    path = record.get("path")
    if kind not in RECORD_KINDS or not isinstance(path, str):
        raise ApplyError(f"cannot restore {path!r}: malformed backup record (kind {kind!r})")
    fs.confine(path)
    if kind == "absent":
        fs.remove_tree(path)
        return
    mode, uid, gid = _record_attrs(record, path)
    current = fs.lstat(path)
    if current is not None and current.kind != kind:
        fs.remove_tree(path)
    if kind == "file":
        data = _read_blob(store, record, path, key)
        fs.write_file(path, data, mode=mode, uid=uid, gid=gid)
    elif kind == "symlink":
        target = record.get("target")
        if not isinstance(target, str):
            raise ApplyError(f"cannot restore {path}: symlink record without a target")
        fs.make_symlink(path, target)
        fs.set_attrs(path, uid=uid, gid=gid)
    else:
        _restore_dir(fs, record, store, key=key, mode=mode, uid=uid, gid=gid)


def _restore_dir(fs: FsRoot, record: dict[str, Any], store: Path, *, key: bytes | None,
                 mode: int, uid: int, gid: int) -> None:
    path: str = record["path"]
    children = record.get("children")
    if children is None:
        fs.make_dir(path, mode=mode, uid=uid, gid=gid)
        return
    if not isinstance(children, list):
        raise ApplyError(f"cannot restore {path}: malformed children list")
    # Writable while children are restored; the recorded mode is set last.
    fs.make_dir(path, mode=0o700)
    keep = set()
    for child in children:
        cpath = child.get("path") if isinstance(child, dict) else None
        if not isinstance(cpath, str) or cpath.rpartition("/")[0] != path:
            raise ApplyError(f"cannot restore {path}: child record {cpath!r} is not inside it")
        keep.add(cpath.rpartition("/")[2])
    for name in fs.list_dir(path):
        if name not in keep:
            fs.remove_tree(f"{path}/{name}")
    for child in children:
        restore(fs, child, store, key=key)
    fs.set_attrs(path, mode=mode, uid=uid, gid=gid)


def _record_attrs(record: dict[str, Any], path: str) -> tuple[int, int, int]:
    vals = (record.get("mode"), record.get("uid"), record.get("gid"))
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ApplyError(f"cannot restore {path}: malformed mode/uid/gid in the backup record")
    mode, uid, gid = vals
    assert isinstance(mode, int)
    assert isinstance(uid, int)
    assert isinstance(gid, int)
    return check_mode(mode), uid, gid


def _read_blob(store: Path, record: dict[str, Any], path: str, key: bytes | None) -> bytes:
    blob = record.get("blob")
    if not isinstance(blob, str) or len(blob) != 64 or not all(c in "0123456789abcdef" for c in blob):
        raise ApplyError(f"cannot restore {path}: malformed blob name in the backup record")
    try:
        fd = os.open(store / blob, READ_FLAGS)
        try:
            chunks = []
            while chunk := os.read(fd, CHUNK):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ApplyError(f"cannot restore {path}: backup blob {blob} unreadable: {exc.strerror}") from exc
    data = b"".join(chunks)
    check = _blob_hasher(key)
    check.update(data)
    if not hmac.compare_digest(check.hexdigest(), blob):
        raise ApplyError(f"cannot restore {path}: backup blob {blob} is corrupted")
    return data
