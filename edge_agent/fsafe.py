"""Confined, atomic, symlink-proof file operations on the device filesystem, plus backup/restore.

Every driver writes through :class:`FsRoot`. A device path such as ``/etc/motd`` is first checked
against the profile's allowed roots (:func:`edge_core.paths.check_confined`), then resolved one
component at a time from a directory fd of the root with ``openat`` semantics and ``O_NOFOLLOW``:
an intermediate component that is a symlink (even one pointing back inside the root) or not a
directory is refused with :class:`ConfinementError`. Because each step opens the next directory
relative to the fd of the previous one, swapping a parent for a symlink after the check cannot
redirect a write (no TOCTOU on parents).

Writes are atomic: a temp file named ``.ef-tmp-<random>`` is created next to the target
(``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600), written, given its mode and owner, fsync'd, renamed
over the target, and the directory is fsync'd. A crash at any instant leaves the target old or
new; a leftover temp file is recognisable by :data:`TEMP_PREFIX` and removed by
:meth:`FsRoot.clean_temp_files`.

:meth:`FsRoot.capture` and :meth:`FsRoot.restore` back up and put back the state of one path
(absent, file, directory, symlink; optionally a whole tree) as a JSON-able record whose file
contents live in a content-addressed blob store, written and fsync'd before ``capture`` returns.

Attribute arguments: ``uid``/``gid`` ``None`` keeps the current owner of an existing entry (a new
entry gets the agent's). Attributes are only changed when they differ, so no-op runs make no
``chown`` calls and work unprivileged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol

from edge_agent.errors import ApplyError
from edge_core.errors import ConfigError, ConfinementError, PathError
from edge_core.paths import check_confined, is_under, validate_device_path

__all__ = [
    "DEFAULT_MAX_BYTES",
    "TEMP_PREFIX",
    "Entry",
    "FsRoot",
    "is_temp_name",
    "referenced_blobs",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default cap on :meth:`FsRoot.read_file`."""

TEMP_PREFIX = ".ef-tmp-"
"""Every temp file or symlink this module creates starts with this prefix."""

_DIR_CACHE_MAX = 1024  # directories kept open by FsRoot.observing()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_DIR_MODE = 0o755
_CHUNK = 1024 * 1024

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}
_RECORD_KINDS = ("absent", "file", "dir", "symlink")


@dataclass(frozen=True)
class Entry:
    """What is at a device path, as seen by ``lstat`` (a final symlink is not followed)."""

    kind: str
    """One of ``file``, ``dir``, ``symlink``, ``fifo``, ``socket``, ``chardev``, ``blockdev``."""
    mode: int
    """Permission bits including setuid/setgid/sticky (``st_mode & 0o7777``)."""
    uid: int
    gid: int
    size: int
    target: str | None = None
    """The link text of a symlink; ``None`` for everything else."""


def is_temp_name(name: str) -> bool:
    """Tell whether a directory entry name is one of this module's temp files."""
    return name.startswith(TEMP_PREFIX)


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


@functools.lru_cache(maxsize=4096)
def _check_confined(path: str, allowed: tuple[str, ...], denied: tuple[str, ...]) -> None:
    """Refuse ``path`` unless it is a valid device path inside ``allowed`` and outside ``denied``.

    Pure, so a path that passed is remembered (a daemon checks the same paths at every sync); a
    refusal raises and is never remembered.
    """
    check_confined(path, allowed)
    if denied and is_under(path, denied):
        raise ConfinementError(f"{path} is inside a root the device profile denies")


def _kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "unknown")


def _temp_name() -> str:
    return TEMP_PREFIX + secrets.token_hex(8)


def _check_mode(mode: int) -> int:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ApplyError(f"invalid file mode {mode!r}")
    return mode


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fix_attrs(fd: int, st: os.stat_result, mode: int | None, uid: int | None, gid: int | None) -> None:
    """Set owner then mode on an open fd, only where they differ (chown first: it clears setuid)."""
    want_uid = st.st_uid if uid is None else uid
    want_gid = st.st_gid if gid is None else gid
    if (want_uid, want_gid) != (st.st_uid, st.st_gid):
        os.fchown(fd, want_uid, want_gid)
        st = os.fstat(fd)
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)


def _mkdir_atomic(pfd: int, name: str, mode: int, uid: int | None, gid: int | None) -> None:
    """Create directory ``name`` already carrying its mode and owner: built under a temp name, then
    renamed into place, so a crash leaves either no directory or the finished one.

    Raises FileExistsError when ``name`` exists (the temp directory is removed again).
    """
    tmp = _temp_name()
    os.mkdir(tmp, 0o700, dir_fd=pfd)
    try:
        dfd = os.open(tmp, _DIR_FLAGS, dir_fd=pfd)
        try:
            _fix_attrs(dfd, os.fstat(dfd), mode, uid, gid)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if FsRoot._lstat_at(pfd, name) is not None:
            raise FileExistsError(errno.EEXIST, "exists", name)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(tmp, dir_fd=pfd)
        raise
    os.fsync(pfd)


class _Translated:
    """Turn an OSError into ApplyError naming the device path (ELOOP means a symlink: confinement)."""

    __slots__ = ("action", "path")

    def __init__(self, path: str, action: str) -> None:
        self.path = path
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, OSError):
            if exc.errno == errno.ELOOP:
                raise ConfinementError(f"cannot {self.action} {self.path}: a symlink is in the way") from exc
            reason = exc.strerror or exc.__class__.__name__
            raise ApplyError(f"cannot {self.action} {self.path}: {reason}") from exc


class FsRoot:
    """The device filesystem below ``root``, confined to ``allowed_roots`` (device paths).

    Open once, reuse for many operations, then :meth:`close` (or use it as a context manager).
    """

    def __init__(self, root: Path, allowed_roots: tuple[str, ...], *, denied_roots: tuple[str, ...] = (),
                 blob_key: bytes | None = None) -> None:
        """Open ``root`` and remember the allowed roots (and the denied roots inside them).

        ``blob_key`` names backup blobs by HMAC-SHA256 under that device-local key instead of a
        plain SHA-256, so the state database never holds a guessable hash of a captured secret.

        Raises:
            ConfigError: an allowed root is not an absolute normalised device path, or ``root``
                is not a directory that can be opened.
        """
        for r in allowed_roots:
            if r != "/":
                try:
                    validate_device_path(r)
                except PathError as exc:
                    raise ConfigError(f"allowed root {r!r} is not a device path: {exc}") from exc
        for r in denied_roots:
            try:
                validate_device_path(r)
            except PathError as exc:
                raise ConfigError(f"denied root {r!r} is not a device path: {exc}") from exc
        self.root = Path(root)
        self.allowed_roots = tuple(allowed_roots)
        self.denied_roots = tuple(denied_roots)
        self._blob_key = blob_key
        self._dir_cache: dict[str, int] | None = None  # parent path -> fd, only inside observing()
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"device root {self.root} cannot be opened: {exc.strerror}") from exc

    # -- lifecycle ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def observing(self) -> Iterator[None]:
        """Within the block, reuse the parent directories walked by operations that create nothing.

        Observing many files of the same directories (planning a release) then opens each
        directory once instead of once per file. Each directory is still opened from the root one
        ``O_NOFOLLOW`` component at a time the first time; what the block reads is what was there
        when the walk was made, and nothing is ever written through a cached directory (writes
        walk afresh). Not re-entrant; the directories are closed when the block ends.
        """
        if self._dir_cache is not None:
            raise ApplyError("observing() is already active")
        self._dir_cache = {}
        try:
            yield
        finally:
            cache, self._dir_cache = self._dir_cache, None
            for fd in cache.values():
                _close(fd)

    def close(self) -> None:
        """Close the root directory fd; further calls raise ApplyError."""
        if self._root_fd >= 0:
            _close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> FsRoot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- walking --------------------------------------------------------------------------------

    def _confine(self, path: str) -> None:
        _check_confined(path, self.allowed_roots, self.denied_roots)

    def _parts(self, path: str) -> list[str]:
        self._confine(path)
        if self._root_fd < 0:
            raise ApplyError(f"cannot use {path}: the device root is closed")
        return path.split("/")[1:]

    def _parent(self, path: str, *, create: bool = False) -> _Parent:
        """A context manager giving ``(parent dir fd, final name)``, or ``None`` if a parent is absent.

        With ``create`` missing parents are made (mode 0755, parent fsync'd). A parent that is a
        symlink or not a directory raises ConfinementError.
        """
        return _Parent(self, path, create)

    @staticmethod
    def _make_parent(parent_fd: int, name: str, walked: str) -> int:
        # An existing one (or one made by a racing creator) is opened below, still refusing symlinks.
        with _Translated(walked, "create directory"), contextlib.suppress(FileExistsError):
            _mkdir_atomic(parent_fd, name, _NEW_DIR_MODE, None, None)
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise ConfinementError(f"parent {walked} is a symlink or not a directory") from exc

    @staticmethod
    def _lstat_at(fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- reading --------------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """Return where device ``path`` lives on this host (for messages and tests only).

        Raises:
            PathError: malformed path.
            ConfinementError: outside the allowed roots.
        """
        self._confine(path)
        return self.root / path.lstrip("/")

    def guard_exists(self, path: str) -> bool:
        """Tell whether anything exists at ``path``, for read-only guards such as ``creates``.

        Unlike every other method this is not confined to the allowed roots and follows
        symlinks on the way (``/bin`` is a symlink on merged-/usr systems): it only answers
        "exists?", never reads or writes, so a guard may name a file the profile does not manage.

        Raises:
            PathError: malformed path (relative, ``..``, NUL).
        """
        validate_device_path(path)
        return os.path.lexists(self.root / path.lstrip("/"))

    def lstat(self, path: str) -> Entry | None:
        """Describe what is at ``path`` without following a final symlink; ``None`` when absent.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, or a symlinked parent.
            ApplyError: the OS refused.
        """
        with _Translated(path, "inspect"), self._parent(path) as at:
            st = None if at is None else self._lstat_at(*at)
            return None if at is None or st is None else _entry(at[0], at[1], st)

    def observe(self, path: str) -> tuple[Entry | None, str | None]:
        """Return :meth:`lstat` and, for a regular file, :meth:`sha256` of ``path`` in one walk.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, or a symlinked parent.
            ApplyError: the OS refused.
        """
        with _Translated(path, "inspect"), self._parent(path) as at:
            st = None if at is None else self._lstat_at(*at)
            if at is None or st is None:
                return None, None
            entry = _entry(at[0], at[1], st)
            if entry.kind != "file":
                return entry, None
            fd, fst = _open_regular_at(at[0], at[1], st, path)
            try:
                return entry, _hash_fd(fd, fst.st_size)
            finally:
                os.close(fd)

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        """Return the content of the regular file at ``path``.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or the
                entry is a symlink, FIFO, device or directory.
            ApplyError: absent, larger than ``max_bytes``, or the OS refused.
        """
        with _Translated(path, "read"), self._parent(path) as at:
            st = None if at is None else self._lstat_at(*at)
            if at is None or st is None:
                raise ApplyError(f"cannot read {path}: no such file")
            fd, fst = _open_regular_at(at[0], at[1], st, path)
            try:
                if fst.st_size > max_bytes:
                    raise ApplyError(f"cannot read {path}: {fst.st_size} bytes, over the cap {max_bytes}")
                chunks: list[bytes] = []
                total = 0
                while chunk := os.read(fd, min(_CHUNK, fst.st_size + 1, max_bytes + 1 - total)):
                    total += len(chunk)
                    if total > max_bytes:
                        raise ApplyError(f"cannot read {path}: it grew over the cap of {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                os.close(fd)

    def sha256(self, path: str) -> str | None:
        """Return the hex SHA-256 of the regular file at ``path``, ``None`` when absent.

        Raises:
            PathError, ConfinementError: as :meth:`read_file` (a non-regular entry is refused).
            ApplyError: the OS refused.
        """
        with _Translated(path, "read"), self._parent(path) as at:
            st = None if at is None else self._lstat_at(*at)
            if at is None or st is None:
                return None
            fd, fst = _open_regular_at(at[0], at[1], st, path)
            try:
                return _hash_fd(fd, fst.st_size)
            finally:
                os.close(fd)

    # -- writing --------------------------------------------------------------------------------

    def write_file(
        self, path: str, data: bytes, *, mode: int, uid: int | None = None, gid: int | None = None
    ) -> None:
        """Atomically replace (or create) the regular file at ``path`` with ``data``.

        Missing parent directories are created (0755). ``uid``/``gid`` ``None`` keep the owner of
        an existing file (a new one gets the agent's).

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or the
                target is a symlink, directory, FIFO or device.
            ApplyError: the OS refused (disk full, permission, ...).
        """
        _check_mode(mode)
        with _Translated(path, "write"), self._parent(path, create=True) as at:
            assert at is not None
            pfd, name = at
            old = self._lstat_at(pfd, name)
            if old is not None:
                if not stat.S_ISREG(old.st_mode):
                    raise ConfinementError(f"refusing to write {path}: it is a {_kind_of(old.st_mode)}")
                uid = old.st_uid if uid is None else uid
                gid = old.st_gid if gid is None else gid
            tmp = _temp_name()
            fd = os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=pfd)
            try:
                try:
                    _write_all(fd, data)
                    _fix_attrs(fd, os.fstat(fd), mode, uid, gid)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)
                raise
            os.fsync(pfd)

    def make_dir(
        self, path: str, *, mode: int | None = None, uid: int | None = None, gid: int | None = None
    ) -> None:
        """Make sure ``path`` is a directory (parents created) with the given attributes.

        A new directory gets ``mode`` or 0755; an existing one only changes what is given.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or an
                existing entry that is not a directory (a symlink to one included).
            ApplyError: the OS refused.
        """
        if mode is not None:
            _check_mode(mode)
        with _Translated(path, "create directory"), self._parent(path, create=True) as at:
            assert at is not None
            pfd, name = at
            created = False
            try:
                _mkdir_atomic(pfd, name, _NEW_DIR_MODE if mode is None else mode, uid, gid)
                created = True
            except FileExistsError:
                pass
            try:
                dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ConfinementError(f"refusing to make directory {path}: not a dir") from exc
                raise
            try:
                if not created:
                    _fix_attrs(dfd, os.fstat(dfd), mode, uid, gid)
            finally:
                os.close(dfd)

    def set_attrs(
        self, path: str, *, mode: int | None = None, uid: int | None = None, gid: int | None = None
    ) -> None:
        """Set mode/owner/group of the entry at ``path`` without following a final symlink.

        For a symlink only ``uid``/``gid`` apply (``mode`` is ignored: Linux has none). A regular
        file with several hard links is refused (its inode may be shared with a file outside the
        roots); :meth:`write_file` replaces it with a fresh inode instead.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, a
                FIFO/socket/device at ``path``, or a hard-linked regular file.
            ApplyError: absent, or the OS refused.
        """
        if mode is not None:
            _check_mode(mode)
        with _Translated(path, "set attributes of"), self._parent(path) as at:
            st = None if at is None else self._lstat_at(*at)
            if at is None or st is None:
                raise ApplyError(f"cannot set attributes of {path}: no such file or directory")
            pfd, name = at
            if stat.S_ISLNK(st.st_mode):
                want = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
                if want != (st.st_uid, st.st_gid):
                    os.chown(name, *want, dir_fd=pfd, follow_symlinks=False)
                return
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise ConfinementError(f"refusing to change {path}: it is a {_kind_of(st.st_mode)}")
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                # A hard link may share its inode with a file elsewhere: rewrite it instead.
                raise ConfinementError(f"refusing to change {path} in place: it has {st.st_nlink} hard links")
            self._set_attrs_open(pfd, name, st, mode=mode, uid=uid, gid=gid, path=path)

    @staticmethod
    def _set_attrs_open(
        pfd: int,
        name: str,
        st: os.stat_result,
        *,
        mode: int | None,
        uid: int | None,
        gid: int | None,
        path: str,
    ) -> None:
        flags = _DIR_FLAGS if stat.S_ISDIR(st.st_mode) else _READ_FLAGS
        try:
            fd = os.open(name, flags, dir_fd=pfd)
            via_proc = False
        except PermissionError:
            # Unreadable entry we may still own: an O_PATH fd names the inode, /proc applies to it.
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            via_proc = True
        try:
            fst = os.fstat(fd)
            if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev) or stat.S_ISLNK(fst.st_mode):
                raise ConfinementError(f"{path} was replaced while its attributes were set")
            if not via_proc:
                _fix_attrs(fd, fst, mode, uid, gid)
                return
            proc = f"/proc/self/fd/{fd}"
            want = (fst.st_uid if uid is None else uid, fst.st_gid if gid is None else gid)
            if want != (fst.st_uid, fst.st_gid):
                os.chown(proc, *want)
                fst = os.fstat(fd)
            if mode is not None and stat.S_IMODE(fst.st_mode) != mode:
                os.chmod(proc, mode)
        finally:
            os.close(fd)

    def make_symlink(self, path: str, target: str) -> None:
        """Atomically make ``path`` a symlink to ``target`` (replacing a file or symlink).

        The target text is stored as given and never followed by this module.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or a
                directory/special file at ``path``.
            ApplyError: an empty or NUL-containing target, or the OS refused.
        """
        if not isinstance(target, str) or not target or "\x00" in target:
            raise ApplyError(f"cannot link {path}: invalid symlink target {target!r}")
        with _Translated(path, "link"), self._parent(path, create=True) as at:
            assert at is not None
            pfd, name = at
            old = self._lstat_at(pfd, name)
            if old is not None:
                if stat.S_ISLNK(old.st_mode) and os.readlink(name, dir_fd=pfd) == target:
                    return
                if not (stat.S_ISREG(old.st_mode) or stat.S_ISLNK(old.st_mode)):
                    raise ConfinementError(f"refusing to replace {path}: it is a {_kind_of(old.st_mode)}")
            tmp = _temp_name()
            os.symlink(target, tmp, dir_fd=pfd)
            try:
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)
                raise
            os.fsync(pfd)

    def remove(self, path: str) -> None:
        """Remove the file, symlink, special file or EMPTY directory at ``path``; absent is fine.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, or a symlinked parent.
            ApplyError: a non-empty directory, or the OS refused.
        """
        with _Translated(path, "remove"), self._parent(path) as at:
            if at is None:
                return
            pfd, name = at
            st = self._lstat_at(pfd, name)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
            os.fsync(pfd)

    def remove_tree(self, path: str) -> None:
        """Remove whatever is at ``path``, recursively for a directory, never following symlinks.

        A symlink inside the tree is removed itself; what it points to is untouched.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, or a symlinked parent.
            ApplyError: the OS refused.
        """
        with _Translated(path, "remove"), self._parent(path) as at:
            if at is None:
                return
            pfd, name = at
            st = self._lstat_at(pfd, name)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                _remove_dir_at(pfd, name)
            else:
                os.unlink(name, dir_fd=pfd)
            os.fsync(pfd)

    def fsync_dir(self, path: str) -> None:
        """fsync the directory at ``path`` (so that renames inside it are durable).

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or not
                a directory.
            ApplyError: absent, or the OS refused.
        """
        with _Translated(path, "fsync"), self._parent(path) as at:
            if at is None:
                raise ApplyError(f"cannot fsync {path}: no such directory")
            pfd, name = at
            try:
                dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except NotADirectoryError as exc:
                raise ConfinementError(f"cannot fsync {path}: not a directory") from exc
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def clean_temp_files(self, path: str) -> int:
        """Remove leftover ``.ef-tmp-*`` entries in the directory ``path``; return how many.

        Only this module's temp files, symlinks and half-built directories are touched; an absent
        directory is fine.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or not
                a directory.
            ApplyError: the OS refused.
        """
        removed = 0
        with _Translated(path, "clean"), self._parent(path) as at:
            if at is None:
                return 0
            pfd, name = at
            try:
                dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                return 0
            except NotADirectoryError as exc:
                raise ConfinementError(f"cannot clean {path}: not a directory") from exc
            try:
                for entry_name in os.listdir(dfd):
                    if not is_temp_name(entry_name):
                        continue
                    st = os.stat(entry_name, dir_fd=dfd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                        os.unlink(entry_name, dir_fd=dfd)
                        removed += 1
                    elif stat.S_ISDIR(st.st_mode):  # a directory being built when the agent died
                        _remove_dir_at(dfd, entry_name)
                        removed += 1
                if removed:
                    os.fsync(dfd)
            finally:
                os.close(dfd)
        if removed:
            log.info("removed %s leftover temp files in %s", removed, path)
        return removed

    # -- backup / restore -----------------------------------------------------------------------

    def capture(self, path: str, store: Path, *, recursive: bool = False) -> dict[str, Any]:
        """Record the current state of ``path`` so that :meth:`restore` can put it back.

        The record is JSON-able: ``path``, ``kind`` (``absent``/``file``/``dir``/``symlink``),
        ``mode``, ``uid``, ``gid``, ``target``, ``blob`` and ``sha256`` (file content, stored once
        per content in ``store`` and fsync'd before this returns) and, for a directory captured
        with ``recursive=True``, ``children`` (the records of its entries; ``None`` otherwise).

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or a
                special file (FIFO, socket, device) at or below ``path``.
            ApplyError: the OS refused, or the store cannot be written.
        """
        with _Translated(path, "back up"), self._parent(path) as at:
            if at is None:
                return _absent_record(path)
            store_fd = _open_store(store)
            try:
                return _capture_at(at[0], at[1], path, _Store(store_fd, self._blob_key), recursive)
            finally:
                os.close(store_fd)

    def restore(self, record: dict[str, Any], store: Path) -> None:
        """Put the path of ``record`` back exactly as recorded; doing it twice is harmless.

        ``absent`` removes whatever is there now (recursively, without following symlinks); a
        recursive directory record also removes entries that were not there at capture time.

        Raises:
            PathError, ConfinementError: bad path in the record, outside the roots, a symlinked
                parent.
            ApplyError: a malformed record, a missing or corrupted blob, or the OS refused.
        """
        kind = record.get("kind")
        path = record.get("path")
        if kind not in _RECORD_KINDS or not isinstance(path, str):
            raise ApplyError(f"cannot restore {path!r}: malformed backup record (kind {kind!r})")
        self._confine(path)
        if kind == "absent":
            self.remove_tree(path)
            return
        mode, uid, gid = _record_attrs(record, path)
        current = self.lstat(path)
        if current is not None and current.kind != kind:
            self.remove_tree(path)
        if kind == "file":
            data = _read_blob(store, record, path, self._blob_key)
            self.write_file(path, data, mode=mode, uid=uid, gid=gid)
        elif kind == "symlink":
            target = record.get("target")
            if not isinstance(target, str):
                raise ApplyError(f"cannot restore {path}: symlink record without a target")
            self.make_symlink(path, target)
            self.set_attrs(path, uid=uid, gid=gid)
        else:
            self._restore_dir(record, store, mode=mode, uid=uid, gid=gid)

    def _restore_dir(self, record: dict[str, Any], store: Path, *, mode: int, uid: int, gid: int) -> None:
        path: str = record["path"]
        children = record.get("children")
        if children is None:
            self.make_dir(path, mode=mode, uid=uid, gid=gid)
            return
        if not isinstance(children, list):
            raise ApplyError(f"cannot restore {path}: malformed children list")
        # Writable while children are restored; the recorded mode is set last.
        self.make_dir(path, mode=0o700)
        keep = set()
        for child in children:
            cpath = child.get("path") if isinstance(child, dict) else None
            if not isinstance(cpath, str) or cpath.rpartition("/")[0] != path:
                raise ApplyError(f"cannot restore {path}: child record {cpath!r} is not inside it")
            keep.add(cpath.rpartition("/")[2])
        for name in self._list_dir(path):
            if name not in keep:
                self.remove_tree(f"{path}/{name}")
        for child in children:
            self.restore(child, store)
        self.set_attrs(path, mode=mode, uid=uid, gid=gid)

    def _list_dir(self, path: str) -> list[str]:
        with _Translated(path, "list"), self._parent(path) as at:
            if at is None:
                return []
            dfd = os.open(at[1], _DIR_FLAGS, dir_fd=at[0])
            try:
                return os.listdir(dfd)
            finally:
                os.close(dfd)


class _Parent:
    """Walks a device path from the root fd, one ``O_NOFOLLOW`` directory at a time."""

    __slots__ = ("create", "fd", "fs", "path")

    def __init__(self, fs: FsRoot, path: str, create: bool) -> None:
        self.fs = fs
        self.path = path
        self.create = create
        self.fd = -1

    def __enter__(self) -> tuple[int, str] | None:
        path = self.path
        parts = self.fs._parts(path)
        cache = None if self.create else self.fs._dir_cache
        if cache is not None and len(parts) > 1:
            key = "/".join(parts[:-1])
            cached = cache.get(key)
            if cached is not None:
                return cached, parts[-1]
        at = self._walk(path, parts)
        if at is not None and cache is not None and self.fd >= 0 and len(cache) < _DIR_CACHE_MAX:
            cache["/".join(parts[:-1])] = self.fd  # owned by the cache from now on
            self.fd = -1
        return at

    def _walk(self, path: str, parts: list[str]) -> tuple[int, str] | None:
        root_fd = fd = self.fs._root_fd
        walked = ""
        keep = False
        try:
            for name in parts[:-1]:
                walked += "/" + name
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not self.create:
                        return None
                    nfd = FsRoot._make_parent(fd, name, walked)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ConfinementError(
                            f"{path}: parent {walked} is a symlink or not a directory"
                        ) from exc
                    raise ApplyError(f"cannot open {walked}: {exc.strerror}") from exc
                if fd != root_fd:
                    os.close(fd)
                fd = nfd
            keep = True
            return fd, parts[-1]
        finally:
            if fd != root_fd:
                if keep:
                    self.fd = fd
                else:
                    _close(fd)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1


# -- helpers working on fds ---------------------------------------------------------------------


def _entry(pfd: int, name: str, st: os.stat_result) -> Entry:
    return Entry(
        kind=_kind_of(st.st_mode),
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        target=os.readlink(name, dir_fd=pfd) if stat.S_ISLNK(st.st_mode) else None,
    )


def _open_regular_at(pfd: int, name: str, st: os.stat_result, path: str) -> tuple[int, os.stat_result]:
    """Open the regular file ``name`` (already lstat'ed as ``st``) without following; return fd, fstat.

    A special file is never opened (opening a device or FIFO can have side effects).
    """
    if not stat.S_ISREG(st.st_mode):
        raise ConfinementError(f"{path} is a {_kind_of(st.st_mode)}, not a regular file")
    fd = os.open(name, _READ_FLAGS, dir_fd=pfd)
    try:
        fst = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(fst.st_mode) or (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
        os.close(fd)
        raise ConfinementError(f"{path} was replaced while being opened")
    return fd, fst


def _hash_fd(fd: int, size_hint: int) -> str:
    digest = hashlib.sha256()
    want = min(_CHUNK, size_hint + 1)
    while chunk := os.read(fd, want):
        digest.update(chunk)
    return digest.hexdigest()


def _remove_dir_at(pfd: int, name: str) -> None:
    """Remove directory ``name`` below ``pfd`` and everything in it, never following symlinks."""
    dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        for child in os.listdir(dfd):
            st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                _remove_dir_at(dfd, child)
            else:
                os.unlink(child, dir_fd=dfd)
    finally:
        os.close(dfd)
    os.rmdir(name, dir_fd=pfd)


def _absent_record(path: str) -> dict[str, Any]:
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


def _capture_at(pfd: int, name: str, path: str, store: _Store, recursive: bool) -> dict[str, Any]:
    st = FsRoot._lstat_at(pfd, name)
    if st is None:
        return _absent_record(path)
    rec = _absent_record(path)
    rec.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        rec.update(kind="symlink", target=os.readlink(name, dir_fd=pfd))
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, _READ_FLAGS, dir_fd=pfd)
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
            dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                rec["children"] = [
                    _capture_at(dfd, child, f"{path}/{child}", store, True)
                    for child in sorted(os.listdir(dfd))
                ]
            finally:
                os.close(dfd)
    else:
        raise ConfinementError(f"refusing to back up {path}: it is a {_kind_of(st.st_mode)}")
    return rec


def _open_store(store: Path) -> int:
    try:
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(store, _DIR_FLAGS)
    except OSError as exc:
        raise ApplyError(f"cannot open the backup store {store}: {exc.strerror}") from exc


def _store_blob(store: _Store, src_fd: int) -> str:
    """Copy ``src_fd`` into the store under its (keyed) digest, once per content, fsync'd; return it."""
    store_fd = store.fd
    tmp = _temp_name()
    out = os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=store_fd)
    digest = _blob_hasher(store.key)
    try:
        try:
            while chunk := os.read(src_fd, _CHUNK):
                digest.update(chunk)
                _write_all(out, chunk)
            hexd = digest.hexdigest()
            if FsRoot._lstat_at(store_fd, hexd) is not None:
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


def _record_attrs(record: dict[str, Any], path: str) -> tuple[int, int, int]:
    vals = (record.get("mode"), record.get("uid"), record.get("gid"))
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ApplyError(f"cannot restore {path}: malformed mode/uid/gid in the backup record")
    mode, uid, gid = vals
    assert isinstance(mode, int)
    assert isinstance(uid, int)
    assert isinstance(gid, int)
    return _check_mode(mode), uid, gid


def _read_blob(store: Path, record: dict[str, Any], path: str, key: bytes | None) -> bytes:
    blob = record.get("blob")
    if not isinstance(blob, str) or len(blob) != 64 or not all(c in "0123456789abcdef" for c in blob):
        raise ApplyError(f"cannot restore {path}: malformed blob name in the backup record")
    try:
        fd = os.open(store / blob, _READ_FLAGS)
        try:
            chunks = []
            while chunk := os.read(fd, _CHUNK):
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
