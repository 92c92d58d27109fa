"""The fd primitives under :mod:`edge_agent.fsafe`: open flags, temp names, attribute fixes, walking.

Everything here works on directory file descriptors with ``*at`` semantics and never follows a
symlink: :class:`ParentWalk` opens the parents of a device path one ``O_NOFOLLOW`` component at a
time from the root fd, :func:`mkdir_atomic` builds a directory under a temp name and renames it
into place, :class:`Translated` turns an ``OSError`` into the agent's one-line errors. Device paths
are checked against the profile's roots by the caller (:class:`edge_agent.fsafe.FsRoot`) before
anything here runs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from types import TracebackType

from edge_agent.errors import ApplyError
from edge_core.errors import ConfinementError

__all__ = [
    "CHUNK",
    "DIR_CACHE_MAX",
    "DIR_FLAGS",
    "NEW_DIR_MODE",
    "READ_FLAGS",
    "TEMP_FLAGS",
    "TEMP_PREFIX",
    "ParentWalk",
    "Translated",
    "check_mode",
    "close_quietly",
    "fix_attrs",
    "hash_fd",
    "is_temp_name",
    "kind_of",
    "lstat_at",
    "mkdir_atomic",
    "open_regular_at",
    "remove_dir_at",
    "remove_temp_entries",
    "set_attrs_at",
    "temp_name",
    "write_all",
]

TEMP_PREFIX = ".ef-tmp-"
"""Every temp file, symlink or directory the file operations create starts with this prefix."""

DIR_CACHE_MAX = 1024  # directories kept open by FsRoot.observing()
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_DIR_MODE = 0o755
CHUNK = 1024 * 1024

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


def is_temp_name(name: str) -> bool:
    """Tell whether a directory entry name is one of the file operations' temp files."""
    return name.startswith(TEMP_PREFIX)


def kind_of(mode: int) -> str:
    """Name the file type of an ``st_mode`` (``file``, ``dir``, ``symlink``, ``fifo``, ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "unknown")


def temp_name() -> str:
    """Return a fresh, unguessable temp entry name carrying :data:`TEMP_PREFIX`."""
    return TEMP_PREFIX + secrets.token_hex(8)


def check_mode(mode: int) -> int:
    """Return ``mode`` if it is a permission mode (0 to 0o7777); raise ApplyError otherwise."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ApplyError(f"invalid file mode {mode!r}")
    return mode


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring an OSError (used on paths that already fail or clean up)."""
    with contextlib.suppress(OSError):
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def lstat_at(fd: int, name: str) -> os.stat_result | None:
    """``lstat`` the entry ``name`` of directory ``fd``; ``None`` when it does not exist."""
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def fix_attrs(fd: int, st: os.stat_result, mode: int | None, uid: int | None, gid: int | None) -> None:
    """Set owner then mode on an open fd, only where they differ (chown first: it clears setuid)."""
    want_uid = st.st_uid if uid is None else uid
    want_gid = st.st_gid if gid is None else gid
    if (want_uid, want_gid) != (st.st_uid, st.st_gid):
        os.fchown(fd, want_uid, want_gid)
        st = os.fstat(fd)
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)


def mkdir_atomic(pfd: int, name: str, mode: int, uid: int | None, gid: int | None) -> None:
    """Create directory ``name`` already carrying its mode and owner: built under a temp name, then
    renamed into place, so a crash leaves either no directory or the finished one.

    Raises FileExistsError when ``name`` exists (the temp directory is removed again).
    """
    tmp = temp_name()
    os.mkdir(tmp, 0o700, dir_fd=pfd)
    try:
        dfd = os.open(tmp, DIR_FLAGS, dir_fd=pfd)
        try:
            fix_attrs(dfd, os.fstat(dfd), mode, uid, gid)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if lstat_at(pfd, name) is not None:
            raise FileExistsError(errno.EEXIST, "exists", name)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(tmp, dir_fd=pfd)
        raise
    os.fsync(pfd)


def open_regular_at(pfd: int, name: str, st: os.stat_result, path: str) -> tuple[int, os.stat_result]:
    """Open the regular file ``name`` (already lstat'ed as ``st``) without following; return fd, fstat.

    A special file is never opened (opening a device or FIFO can have side effects).

    Raises:
        ConfinementError: not a regular file, or replaced between the lstat and the open.
        OSError: the OS refused.
    """
    if not stat.S_ISREG(st.st_mode):
        raise ConfinementError(f"{path} is a {kind_of(st.st_mode)}, not a regular file")
    fd = os.open(name, READ_FLAGS, dir_fd=pfd)
    try:
        fst = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(fst.st_mode) or (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
        os.close(fd)
        raise ConfinementError(f"{path} was replaced while being opened")
    return fd, fst


def hash_fd(fd: int, size_hint: int) -> str:
    """Return the hex SHA-256 of what is left to read from ``fd``."""
    digest = hashlib.sha256()
    want = min(CHUNK, size_hint + 1)
    while chunk := os.read(fd, want):
        digest.update(chunk)
    return digest.hexdigest()


def _owner_may_empty(dfd: int) -> None:
    """Give the owner write and search permission on the open directory ``dfd`` when it lacks them,
    so that an agent not running as root can empty a read-only directory it owns (root needs neither;
    the directory is removed next). Not the owner: left as it is, and the removal reports the refusal."""
    mode = os.fstat(dfd).st_mode
    if mode & stat.S_IRWXU != stat.S_IRWXU:
        with contextlib.suppress(PermissionError):
            os.fchmod(dfd, stat.S_IMODE(mode) | stat.S_IRWXU)


def remove_dir_at(pfd: int, name: str) -> None:
    """Remove directory ``name`` below ``pfd`` and everything in it, never following symlinks."""
    dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    try:
        _owner_may_empty(dfd)
        for child in os.listdir(dfd):
            st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                remove_dir_at(dfd, child)
            else:
                os.unlink(child, dir_fd=dfd)
    finally:
        os.close(dfd)
    os.rmdir(name, dir_fd=pfd)


def remove_temp_entries(dfd: int) -> int:
    """Remove the temp files, symlinks and half-built directories in directory ``dfd``; return how
    many (the directory is fsync'd when any went). Entries without :data:`TEMP_PREFIX` are untouched.
    """
    removed = 0
    for entry_name in os.listdir(dfd):
        if not is_temp_name(entry_name):
            continue
        st = os.stat(entry_name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            os.unlink(entry_name, dir_fd=dfd)
            removed += 1
        elif stat.S_ISDIR(st.st_mode):  # a directory being built when the agent died
            remove_dir_at(dfd, entry_name)
            removed += 1
    if removed:
        os.fsync(dfd)
    return removed


def set_attrs_at(pfd: int, name: str, st: os.stat_result, *, mode: int | None, uid: int | None,
                 gid: int | None, path: str) -> None:
    """Set mode/owner of entry ``name`` of ``pfd`` (a regular file or directory, lstat'ed as ``st``)
    through an fd of that very inode; an unreadable entry is changed through its ``O_PATH`` fd.

    Raises:
        ConfinementError: the entry was replaced since ``st`` was taken.
        OSError: the OS refused.
    """
    flags = DIR_FLAGS if stat.S_ISDIR(st.st_mode) else READ_FLAGS
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
            fix_attrs(fd, fst, mode, uid, gid)
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


class Translated:
    """Turn an OSError into ApplyError naming the device path (ELOOP means a symlink: confinement)."""

    __slots__ = ("action", "path")

    def __init__(self, path: str, action: str) -> None:
        """Name the device path and the action (``write``, ``remove``...) the messages will carry."""
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


def _make_parent(parent_fd: int, name: str, walked: str) -> int:
    # An existing one (or one made by a racing creator) is opened below, still refusing symlinks.
    with Translated(walked, "create directory"), contextlib.suppress(FileExistsError):
        mkdir_atomic(parent_fd, name, NEW_DIR_MODE, None, None)
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise ConfinementError(f"parent {walked} is a symlink or not a directory") from exc


class ParentWalk:
    """A context manager giving ``(parent dir fd, final name)`` of a device path, or ``None`` when a
    parent is absent; walks from the root fd one ``O_NOFOLLOW`` directory at a time.

    With ``create`` missing parents are made (mode 0755, parent fsync'd). A parent that is a
    symlink or not a directory raises ConfinementError. With a ``cache`` (and without ``create``)
    the parent directory fd is looked up there first and, after a walk, kept there (the cache then
    owns it and closes it).
    """

    __slots__ = ("cache", "create", "fd", "parts", "path", "root_fd")

    def __init__(self, root_fd: int, path: str, parts: list[str], *, create: bool,
                 cache: dict[str, int] | None) -> None:
        """Prepare the walk of ``path``, already split into its components ``parts``."""
        self.root_fd = root_fd
        self.path = path
        self.parts = parts
        self.create = create
        self.cache = None if create else cache
        self.fd = -1

    def __enter__(self) -> tuple[int, str] | None:
        parts, cache = self.parts, self.cache
        if cache is not None and len(parts) > 1:
            cached = cache.get("/".join(parts[:-1]))
            if cached is not None:
                return cached, parts[-1]
        at = self._walk()
        if at is not None and cache is not None and self.fd >= 0 and len(cache) < DIR_CACHE_MAX:
            cache["/".join(parts[:-1])] = self.fd  # owned by the cache from now on
            self.fd = -1
        return at

    def _walk(self) -> tuple[int, str] | None:
        root_fd = fd = self.root_fd
        walked = ""
        keep = False
        try:
            for name in self.parts[:-1]:
                walked += "/" + name
                try:
                    nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not self.create:
                        return None
                    nfd = _make_parent(fd, name, walked)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise ConfinementError(
                            f"{self.path}: parent {walked} is a symlink or not a directory"
                        ) from exc
                    raise ApplyError(f"cannot open {walked}: {exc.strerror}") from exc
                if fd != root_fd:
                    os.close(fd)
                fd = nfd
            keep = True
            return fd, self.parts[-1]
        finally:
            if fd != root_fd:
                if keep:
                    self.fd = fd
                else:
                    close_quietly(fd)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd >= 0:
            close_quietly(self.fd)
            self.fd = -1
