"""Confined, atomic, symlink-proof file operations on the device filesystem: :class:`FsRoot`.

Every driver writes through :class:`FsRoot`. A device path such as ``/etc/motd`` is first checked
against the profile's allowed roots (:func:`edge_core.paths.check_confined`), then resolved one
component at a time from a directory fd of the root with ``openat`` semantics and ``O_NOFOLLOW``
(:class:`edge_agent.fsafe_fd.ParentWalk`): an intermediate component that is a symlink (even one
pointing back inside the root) or not a directory is refused with :class:`ConfinementError`.
Because each step opens the next directory relative to the fd of the previous one, swapping a
parent for a symlink after the check cannot redirect a write (no TOCTOU on parents).

Writes are atomic: a temp file named ``.ef-tmp-<random>`` is created next to the target
(``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600), written, given its mode and owner, fsync'd, renamed
over the target, and the directory is fsync'd. A crash at any instant leaves the target old or
new; a leftover temp file is recognisable by :data:`edge_agent.fsafe_fd.TEMP_PREFIX` and removed by
:meth:`FsRoot.clean_temp_files`.

:meth:`FsRoot.capture` and :meth:`FsRoot.restore` back up and put back the state of one path
through the backup store of :mod:`edge_agent.fsafe_backup`.

Attribute arguments: ``uid``/``gid`` ``None`` keeps the current owner of an existing entry (a new
entry gets the agent's). Attributes are only changed when they differ, so no-op runs make no
``chown`` calls and work unprivileged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_agent import fsafe_backup
from edge_agent.errors import ApplyError
from edge_agent.fsafe_fd import (
    CHUNK,
    DIR_FLAGS,
    NEW_DIR_MODE,
    TEMP_FLAGS,
    ParentWalk,
    Translated,
    check_mode,
    close_quietly,
    fix_attrs,
    hash_fd,
    kind_of,
    lstat_at,
    mkdir_atomic,
    open_regular_at,
    remove_dir_at,
    remove_temp_entries,
    set_attrs_at,
    temp_name,
    write_all,
)
from edge_core.errors import ConfigError, ConfinementError, PathError
from edge_core.paths import check_confined, is_under, validate_device_path

__all__ = ["DEFAULT_MAX_BYTES", "Entry", "FsRoot"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default cap on :meth:`FsRoot.read_file`."""


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


@functools.lru_cache(maxsize=4096)
def _check_confined(path: str, allowed: tuple[str, ...], denied: tuple[str, ...]) -> None:
    """Refuse ``path`` unless it is a valid device path inside ``allowed`` and outside ``denied``.

    Pure, so a path that passed is remembered (a daemon checks the same paths at every sync); a
    refusal raises and is never remembered.
    """
    check_confined(path, allowed)
    if denied and is_under(path, denied):
        raise ConfinementError(f"{path} is inside a root the device profile denies")



def _entry(pfd: int, name: str, st: os.stat_result) -> Entry:
    return Entry(
        kind=kind_of(st.st_mode),
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size,
        target=os.readlink(name, dir_fd=pfd) if stat.S_ISLNK(st.st_mode) else None,
    )


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
                close_quietly(fd)

    def close(self) -> None:
        """Close the root directory fd; further calls raise ApplyError."""
        if self._root_fd >= 0:
            close_quietly(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> FsRoot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- walking --------------------------------------------------------------------------------

    def confine(self, path: str) -> None:
        """Refuse ``path`` unless it is a valid device path inside the allowed roots, outside the denied.

        Raises:
            PathError: malformed path.
            ConfinementError: outside the allowed roots or inside a denied one.
        """
        _check_confined(path, self.allowed_roots, self.denied_roots)

    def _parent(self, path: str, *, create: bool = False) -> ParentWalk:
        """A context manager giving ``(parent dir fd, final name)``, or ``None`` if a parent is absent.

        With ``create`` missing parents are made (mode 0755, parent fsync'd). A parent that is a
        symlink or not a directory raises ConfinementError.
        """
        self.confine(path)
        if self._root_fd < 0:
            raise ApplyError(f"cannot use {path}: the device root is closed")
        return ParentWalk(self._root_fd, path, path.split("/")[1:], create=create, cache=self._dir_cache)

    # -- reading --------------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """Return where device ``path`` lives on this host (for messages and tests only).

        Raises:
            PathError: malformed path.
            ConfinementError: outside the allowed roots.
        """
        self.confine(path)
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
        with Translated(path, "inspect"), self._parent(path) as at:
            st = None if at is None else lstat_at(*at)
            return None if at is None or st is None else _entry(at[0], at[1], st)

    def observe(self, path: str) -> tuple[Entry | None, str | None]:
        """Return :meth:`lstat` and, for a regular file, :meth:`sha256` of ``path`` in one walk.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, or a symlinked parent.
            ApplyError: the OS refused.
        """
        with Translated(path, "inspect"), self._parent(path) as at:
            st = None if at is None else lstat_at(*at)
            if at is None or st is None:
                return None, None
            entry = _entry(at[0], at[1], st)
            if entry.kind != "file":
                return entry, None
            fd, fst = open_regular_at(at[0], at[1], st, path)
            try:
                return entry, hash_fd(fd, fst.st_size)
            finally:
                os.close(fd)

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        """Return the content of the regular file at ``path``.

        Raises:
            PathError, ConfinementError: bad path, outside the roots, a symlinked parent, or the
                entry is a symlink, FIFO, device or directory.
            ApplyError: absent, larger than ``max_bytes``, or the OS refused.
        """
        with Translated(path, "read"), self._parent(path) as at:
            st = None if at is None else lstat_at(*at)
            if at is None or st is None:
                raise ApplyError(f"cannot read {path}: no such file")
            fd, fst = open_regular_at(at[0], at[1], st, path)
            try:
                if fst.st_size > max_bytes:
                    raise ApplyError(f"cannot read {path}: {fst.st_size} bytes, over the cap {max_bytes}")
                chunks: list[bytes] = []
                total = 0
                while chunk := os.read(fd, min(CHUNK, fst.st_size + 1, max_bytes + 1 - total)):
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
        with Translated(path, "read"), self._parent(path) as at:
            st = None if at is None else lstat_at(*at)
            if at is None or st is None:
                return None
            fd, fst = open_regular_at(at[0], at[1], st, path)
            try:
                return hash_fd(fd, fst.st_size)
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
        check_mode(mode)
        with Translated(path, "write"), self._parent(path, create=True) as at:
            assert at is not None
            pfd, name = at
            old = lstat_at(pfd, name)
            if old is not None:
                if not stat.S_ISREG(old.st_mode):
                    raise ConfinementError(f"refusing to write {path}: it is a {kind_of(old.st_mode)}")
                uid = old.st_uid if uid is None else uid
                gid = old.st_gid if gid is None else gid
            tmp = temp_name()
            fd = os.open(tmp, TEMP_FLAGS, 0o600, dir_fd=pfd)
            try:
                try:
                    write_all(fd, data)
                    fix_attrs(fd, os.fstat(fd), mode, uid, gid)
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
            check_mode(mode)
        with Translated(path, "create directory"), self._parent(path, create=True) as at:
            assert at is not None
            pfd, name = at
            created = False
            try:
                mkdir_atomic(pfd, name, NEW_DIR_MODE if mode is None else mode, uid, gid)
                created = True
            except FileExistsError:
                pass
            try:
                dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ConfinementError(f"refusing to make directory {path}: not a dir") from exc
                raise
            try:
                if not created:
                    fix_attrs(dfd, os.fstat(dfd), mode, uid, gid)
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
            check_mode(mode)
        with Translated(path, "set attributes of"), self._parent(path) as at:
            st = None if at is None else lstat_at(*at)
            if at is None or st is None:
                raise ApplyError(f"cannot set attributes of {path}: no such file or directory")
            pfd, name = at
            if stat.S_ISLNK(st.st_mode):
                want = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
                if want != (st.st_uid, st.st_gid):
                    os.chown(name, *want, dir_fd=pfd, follow_symlinks=False)
                return
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise ConfinementError(f"refusing to change {path}: it is a {kind_of(st.st_mode)}")
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                # A hard link may share its inode with a file elsewhere: rewrite it instead.
                raise ConfinementError(f"refusing to change {path} in place: it has {st.st_nlink} hard links")
            set_attrs_at(pfd, name, st, mode=mode, uid=uid, gid=gid, path=path)

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
        with Translated(path, "link"), self._parent(path, create=True) as at:
            assert at is not None
            pfd, name = at
            old = lstat_at(pfd, name)
            if old is not None:
                if stat.S_ISLNK(old.st_mode) and os.readlink(name, dir_fd=pfd) == target:
                    return
                if not (stat.S_ISREG(old.st_mode) or stat.S_ISLNK(old.st_mode)):
                    raise ConfinementError(f"refusing to replace {path}: it is a {kind_of(old.st_mode)}")
            tmp = temp_name()
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
        with Translated(path, "remove"), self._parent(path) as at:
            if at is None:
                return
            pfd, name = at
            st = lstat_at(pfd, name)
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
        with Translated(path, "remove"), self._parent(path) as at:
            if at is None:
                return
            pfd, name = at
            st = lstat_at(pfd, name)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                remove_dir_at(pfd, name)
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
        with Translated(path, "fsync"), self._parent(path) as at:
            if at is None:
                raise ApplyError(f"cannot fsync {path}: no such directory")
            pfd, name = at
            try:
                dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
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
        with Translated(path, "clean"), self._parent(path) as at:
            if at is None:
                return 0
            pfd, name = at
            try:
                dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                return 0
            except NotADirectoryError as exc:
                raise ConfinementError(f"cannot clean {path}: not a directory") from exc
            try:
                removed = remove_temp_entries(dfd)
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
        with Translated(path, "back up"), self._parent(path) as at:
            if at is None:
                return fsafe_backup.absent_record(path)
            return fsafe_backup.capture_at(at[0], at[1], path, store, key=self._blob_key, recursive=recursive)

    def restore(self, record: dict[str, Any], store: Path) -> None:
        """Put the path of ``record`` back exactly as recorded; doing it twice is harmless.

        ``absent`` removes whatever is there now (recursively, without following symlinks); a
        recursive directory record also removes entries that were not there at capture time.

        Raises:
            PathError, ConfinementError: bad path in the record, outside the roots, a symlinked
                parent.
            ApplyError: a malformed record, a missing or corrupted blob, or the OS refused.
        """
        fsafe_backup.restore(self, record, store, key=self._blob_key)

    def list_dir(self, path: str) -> list[str]:
        """Return the entry names of the directory at ``path`` (empty when a parent is absent).

        Raises:
            PathError, ConfinementError: bad path, outside the roots, or a symlinked parent.
            ApplyError: absent, not a directory, or the OS refused.
        """
        with Translated(path, "list"), self._parent(path) as at:
            if at is None:
                return []
            dfd = os.open(at[1], DIR_FLAGS, dir_fd=at[0])
            try:
                return os.listdir(dfd)
            finally:
                os.close(dfd)
