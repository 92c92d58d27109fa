"""Bounds on what a Git mirror may make a fetch do: time, refs, and inflated bytes.

A mirror is untrusted until the release it serves is verified, and everything here runs before
any signature check, so each bound holds against a hostile mirror:

* :class:`Deadline` — the whole fetch (connecting, negotiating, receiving, checking, storing) ends
  by ``fetch_deadline``; it is looked at before every read, and a read itself waits at most the
  per-read timeout, so a mirror that drips one byte at a time cannot hold a fetch longer.
* :func:`guard_protocol` — the ref advertisement (every pkt-line the mirror sends before the first
  ``want``) is capped at ``max_refs`` lines and ``max_ref_advertisement_bytes`` bytes while it
  arrives; later non-pack lines (acknowledgements, shallow lines) share the line cap.
* :func:`scan_pack` — the spooled pack is walked object by object *before* any of it is inflated
  whole: each object's inflated size, read from its pack header (for a delta, the result size from
  the delta header), must be at most ``max_object_bytes``, the sizes add up to at most
  ``max_inflated_bytes``, and each object is inflated with a bounded
  ``zlib.decompressobj().decompress(data, max_length)`` loop that refuses an object inflating past
  its declared size. Delta instructions are checked to build exactly the declared result.
* :func:`fetch_lock` — the lock every writer of a repository cache holds; waiting for it counts
  against the deadline.
* :func:`object_header` — the type and inflated size of an object in a repository, read from its
  loose-object or pack header without inflating the object, so a reader can refuse a large blob (or
  an object of the wrong type) before loading it.

A breach raises :class:`LimitExceeded` whose text names the configuration key; malformed data
raises :class:`CorruptObject`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge_core.errors import FetchError

__all__ = ["CorruptObject", "Deadline", "FetchLimits", "HeaderReader", "LimitExceeded", "PackStats",
           "fetch_lock", "guard_protocol", "object_header", "scan_pack"]

MiB = 1024 * 1024
_CHUNK = 64 * 1024
_OFS_DELTA = 6
_REF_DELTA = 7
_BASE_TYPES = (1, 2, 3, 4)
_TYPE_NAMES = {1: b"commit", 2: b"tree", 3: b"blob", 4: b"tag"}
_ADVERTISEMENT_END = (b"want ", b"command=fetch")
_PACK_BANDS = (1, 2, 3)
_LOCK_POLL = 0.1


class LimitExceeded(Exception):
    """A fetch passed one of its :class:`FetchLimits`; the text names the key."""


class CorruptObject(Exception):
    """A pack or object header is malformed, or an object does not inflate as its header says."""


@dataclass(frozen=True)
class FetchLimits:
    """What one fetch may cost; ``key_prefix`` is the config section the keys are named under.

    Attributes:
        max_object_bytes: largest inflated object (and delta) accepted.
        max_inflated_bytes: largest sum of inflated object sizes in one pack.
        max_refs: most pkt-lines in the ref advertisement (and, separately, after it).
        max_ref_advertisement_bytes: most bytes in the ref advertisement.
        fetch_deadline: seconds one whole fetch may take.
        key_prefix: ``repo.`` on a device, ``git.`` on the fleet server.
    """

    max_object_bytes: int = 16 * MiB
    max_inflated_bytes: int = 1024 * MiB
    max_refs: int = 10_000
    max_ref_advertisement_bytes: int = 2 * MiB
    fetch_deadline: float = 300.0
    key_prefix: str = "repo."

    def __post_init__(self) -> None:
        if min(self.max_object_bytes, self.max_inflated_bytes, self.max_refs,
               self.max_ref_advertisement_bytes) <= 0 or self.fetch_deadline <= 0:
            raise ValueError("fetch limits must be positive")

    def breach(self, key: str, detail: str) -> LimitExceeded:
        """Return the exception for a breach of ``key`` (e.g. ``max_object_bytes``)."""
        value: object = getattr(self, key)
        shown = f"{value:g}s" if isinstance(value, float) else str(value)
        return LimitExceeded(f"{detail} exceeds {self.key_prefix}{key} ({shown})")


class Deadline:
    """The moment a fetch must be over, on the monotonic clock."""

    def __init__(self, limits: FetchLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._end = clock() + limits.fetch_deadline

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self._end - self._clock()

    def passed(self) -> bool:
        """Whether the deadline has passed."""
        return self.remaining() <= 0

    def check(self) -> None:
        """Raise :class:`LimitExceeded` once the deadline has passed."""
        if self.passed():
            raise self.limits.breach("fetch_deadline", "fetch")


@contextlib.contextmanager
def fetch_lock(path: Path, deadline: Deadline, *, wait: bool) -> Iterator[bool]:
    """Hold the exclusive lock file ``path``: yield True, or False when ``wait`` is off and it is
    taken. Waiting for it counts against ``deadline``.

    Raises:
        FetchError: the lock file cannot be opened, or the lock is still taken when the deadline passes.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FetchError(f"cannot open the lock {path}: {exc.strerror or exc}") from exc
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if deadline.passed():
                    breach = deadline.limits.breach("fetch_deadline", "waiting for another fetch")
                    raise FetchError(f"the repository cache is busy: {breach}") from None
                time.sleep(_LOCK_POLL)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _ProtocolGuard:
    """Counts what the mirror sends around the pkt-line reads of one dulwich ``Protocol``."""

    def __init__(self, limits: FetchLimits, deadline: Deadline,
                 before_read: Callable[[float], None] | None) -> None:
        self.limits = limits
        self.deadline = deadline
        self.before_read = before_read
        self.advertising = True
        self.lines = 0
        self.bytes = 0
        self.later_lines = 0

    def wrap_read(self, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
        def guarded(size: int) -> bytes:
            self.deadline.check()
            if self.before_read is not None:
                self.before_read(self.deadline.remaining())
            try:
                return read(size)
            except Exception:
                self.deadline.check()  # a read cut short by the deadline reports the deadline
                raise
        return guarded

    def wrap_read_pkt_line(self, read_pkt_line: Callable[[], bytes | None]) -> Callable[[], bytes | None]:
        def guarded() -> bytes | None:
            pkt = read_pkt_line()
            if self.advertising:
                self.lines += 1
                self.bytes += 4 + (len(pkt) if pkt else 0)
                if self.lines > self.limits.max_refs:
                    raise self.limits.breach("max_refs", "ref advertisement line count")
                if self.bytes > self.limits.max_ref_advertisement_bytes:
                    raise self.limits.breach("max_ref_advertisement_bytes", "ref advertisement size")
            elif pkt and pkt[0] not in _PACK_BANDS:
                self.later_lines += 1
                if self.later_lines > self.limits.max_refs:
                    raise self.limits.breach("max_refs", "negotiation line count")
            return pkt
        return guarded

    def wrap_write_pkt_line(self, write: Callable[[bytes | None], None]) -> Callable[[bytes | None], None]:
        def guarded(line: bytes | None) -> None:
            if line is not None and line.startswith(_ADVERTISEMENT_END):
                self.advertising = False
            write(line)
        return guarded


def guard_protocol(proto: Any, limits: FetchLimits, deadline: Deadline,
                   before_read: Callable[[float], None] | None = None) -> None:
    """Bound a dulwich ``Protocol`` by ``limits`` and ``deadline`` (its methods are wrapped in place).

    ``before_read`` receives the seconds left before each read (a socket transport shortens its
    timeout with it).
    """
    guard = _ProtocolGuard(limits, deadline, before_read)
    proto.read = guard.wrap_read(proto.read)
    proto.read_pkt_line = guard.wrap_read_pkt_line(proto.read_pkt_line)
    proto.write_pkt_line = guard.wrap_write_pkt_line(proto.write_pkt_line)


class _Reader:
    """Buffered reads from a file with push-back, bounded by what the caller asks for."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._buf = b""
        self.offset = 0

    def read_some(self, size: int) -> bytes:
        if self._buf:
            data, self._buf = self._buf[:size], self._buf[size:]
        else:
            data = self._file.read(size)
        self.offset += len(data)
        return data

    def read_exact(self, size: int) -> bytes:
        parts = []
        left = size
        while left:
            data = self.read_some(left)
            if not data:
                raise CorruptObject("pack is truncated")
            parts.append(data)
            left -= len(data)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        self._buf = data + self._buf
        self.offset -= len(data)


def _varint_header(reader: _Reader) -> tuple[int, int]:
    """Read a pack object header: (type, inflated size)."""
    byte = reader.read_exact(1)[0]
    kind, size, shift = (byte >> 4) & 7, byte & 0x0F, 4
    while byte & 0x80:
        if shift > 63:
            raise CorruptObject("pack object header is malformed")
        byte = reader.read_exact(1)[0]
        size |= (byte & 0x7F) << shift
        shift += 7
    return kind, size


def _skip_ofs(reader: _Reader) -> None:
    for _ in range(10):
        if not reader.read_exact(1)[0] & 0x80:
            return
    raise CorruptObject("pack delta offset is malformed")


def _inflate(reader: _Reader, declared: int, keep: bool, deadline: Deadline) -> bytes:
    """Inflate one zlib stream from ``reader`` in bounded steps; it must give exactly ``declared``."""
    d = zlib.decompressobj()
    out: list[bytes] = []
    got = 0
    pending = b""
    full = False
    while not d.eof:
        if pending:
            data = pending
        elif full:
            data = b""
        else:
            deadline.check()
            data = reader.read_some(_CHUNK)
            if not data:
                raise CorruptObject("pack is truncated inside an object")
        try:
            produced = d.decompress(data, _CHUNK)
        except zlib.error as exc:
            raise CorruptObject(f"pack object is not valid zlib data ({exc})") from exc
        pending = d.unconsumed_tail
        full = len(produced) == _CHUNK
        got += len(produced)
        if got > declared:
            raise CorruptObject(f"pack object inflates past its declared size of {declared} bytes")
        if keep:
            out.append(produced)
    reader.unread(d.unused_data)  # at the end, the input left over (unconsumed_tail repeats it)
    if got != declared:
        raise CorruptObject(f"pack object inflates to {got} bytes, not its declared {declared}")
    return b"".join(out)


def _delta_varint(delta: bytes, index: int) -> tuple[int, int]:
    size, shift = 0, 0
    while True:
        if index >= len(delta) or shift > 63:
            raise CorruptObject("delta header is malformed")
        byte = delta[index]
        index += 1
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return size, index


def _delta_result_size(delta: bytes, limits: FetchLimits) -> int:
    """The result size a delta declares, checked against the cap and against its instructions."""
    _base, index = _delta_varint(delta, 0)
    result, index = _delta_varint(delta, index)
    if result > limits.max_object_bytes:
        raise limits.breach("max_object_bytes", f"delta result of {result} bytes")
    built = 0
    end = len(delta)
    while index < end:
        op = delta[index]
        index += 1
        if op & 0x80:
            size = 0
            index += bin(op & 0x0F).count("1")  # offset bytes
            for bit in range(3):
                if op & (0x10 << bit):
                    if index >= end:
                        raise CorruptObject("delta copy instruction is truncated")
                    size |= delta[index] << (8 * bit)
                    index += 1
            built += size or 0x10000
        elif op:
            built += op
            index += op
        else:
            raise CorruptObject("delta has a reserved instruction")
        if built > result:
            raise CorruptObject(f"delta builds more than its declared {result} bytes")
    if built != result or index != end:
        raise CorruptObject(f"delta builds {built} bytes, not its declared {result}")
    return result


@dataclass(frozen=True)
class PackStats:
    """What :func:`scan_pack` found: the object count and the sum of inflated sizes."""

    objects: int
    inflated: int


def scan_pack(file: IO[bytes], limits: FetchLimits, deadline: Deadline, *, hash_size: int = 20) -> PackStats:
    """Walk a pack from the start of ``file`` and enforce the inflate limits on every object.

    Nothing larger than ``max_object_bytes`` plus one 64 KiB step is ever held in memory (a delta is
    held to check its instructions; other objects are counted and dropped). ``file`` is left at an
    unspecified position.

    Raises:
        LimitExceeded: an object, a delta result or the total is over its cap, or the deadline passed.
        CorruptObject: the pack is malformed or an object does not inflate to its declared size.
    """
    reader = _Reader(file)
    head = reader.read_exact(12)
    if head[:4] != b"PACK" or int.from_bytes(head[4:8], "big") not in (2, 3):
        raise CorruptObject("pack has no valid header")
    count = int.from_bytes(head[8:12], "big")
    total = 0
    for _ in range(count):
        deadline.check()
        kind, size = _varint_header(reader)
        if size > limits.max_object_bytes:
            raise limits.breach("max_object_bytes", f"object of {size} bytes")
        if kind in _BASE_TYPES:
            _inflate(reader, size, False, deadline)
            inflated = size
        elif kind in (_OFS_DELTA, _REF_DELTA):
            if kind == _OFS_DELTA:
                _skip_ofs(reader)
            else:
                reader.read_exact(hash_size)
            inflated = _delta_result_size(_inflate(reader, size, True, deadline), limits)
        else:
            raise CorruptObject(f"pack object has unknown type {kind}")
        total += inflated
        if total > limits.max_inflated_bytes:
            raise limits.breach("max_inflated_bytes", f"pack inflating to over {total} bytes")
    return PackStats(objects=count, inflated=total)


def _loose_header(path: Path) -> tuple[bytes | None, int] | None:
    """The type and size in a loose object's header (``<type> <size>\\0``), inflating only the header."""
    try:
        with path.open("rb") as f:
            head = zlib.decompressobj().decompress(f.read(256), 64)
    except FileNotFoundError:
        return None
    except (OSError, zlib.error) as exc:
        raise CorruptObject(f"cannot read the header of object {path.name}: {exc}") from exc
    text, sep, _ = head.partition(b"\0")
    fields = text.split(b" ")
    if not sep or len(fields) != 2 or not fields[1].isdigit():
        raise CorruptObject(f"object {path.name} has a malformed header")
    return fields[0], int(fields[1])


def _packed_header(data: bytes, hash_size: int) -> tuple[bytes | None, int]:
    """The type (None for a delta) and inflated size (a delta: its declared result size) of the
    packed object whose first bytes are ``data``."""
    reader = _Reader(io.BytesIO(data))
    kind, size = _varint_header(reader)
    if kind in _BASE_TYPES:
        return _TYPE_NAMES[kind], size
    if kind == _OFS_DELTA:
        _skip_ofs(reader)
    elif kind == _REF_DELTA:
        reader.read_exact(hash_size)
    else:
        raise CorruptObject(f"pack object has unknown type {kind}")
    head = zlib.decompressobj().decompress(reader.read_some(256), 32)
    _base, index = _delta_varint(head, 0)
    result, _ = _delta_varint(head, index)
    return None, result


class HeaderReader:
    """Reads object headers from one dulwich disk object store, keeping its pack files open until
    :meth:`close` (use it as a context manager around a walk of many objects)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._fds: dict[str, int] = {}

    def header(self, sha: bytes) -> tuple[bytes | None, int] | None:
        """Return the type (``b"blob"``, ``b"tree"``, ...; None for a packed delta) and the inflated
        size of object ``sha`` (hex), reading only headers; None when the object is in none of the
        store's packs or loose objects (for example in an alternate).

        Raises:
            CorruptObject: the object's header cannot be read.
        """
        hash_size = len(sha) // 2
        for pack in self._store.packs:
            try:
                offset = pack.index.object_offset(sha)
            except KeyError:
                continue
            path = getattr(pack, "_data_path", None)  # dulwich exposes the pack's full path nowhere else
            if not isinstance(path, str):
                return None
            try:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                return _packed_header(os.pread(fd, 320, offset), hash_size)
            except (OSError, zlib.error) as exc:
                raise CorruptObject(f"cannot read the header of object {sha.decode('ascii')}: {exc}") from exc
        return _loose_header(Path(self._store.path) / sha[:2].decode("ascii") / sha[2:].decode("ascii"))

    def close(self) -> None:
        """Close the pack files opened."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> HeaderReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def object_header(store: Any, sha: bytes) -> tuple[bytes | None, int] | None:
    """:meth:`HeaderReader.header` of one object (see there)."""
    with HeaderReader(store) as reader:
        return reader.header(sha)
