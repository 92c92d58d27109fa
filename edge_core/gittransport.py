"""The shared parts of every transport to a Git mirror: the credentials, the one-line reasons for
their failures, the pack spool and the object walk of a local mirror; used by
:mod:`edge_core.source`, which owns the cache, and :mod:`edge_core.gitfetch`.

The dulwich clients of the network transports (git://, http(s)://, ssh://) live in
:mod:`edge_core.gitclients`, imported by the first fetch that talks to a mirror over the network
or with history: a device whose mirror is a local path, or whose cache already holds the release,
never loads them.

Authentication (:class:`SourceAuth`): over HTTP(S) a ``token`` is sent as HTTP Basic with the user
name ``x-access-token`` and the token as password, which dulwich supports natively and scopes to
the mirror's origin (it is not sent after a redirect to another host); ``username``/``password``
are plain Basic. Over ``ssh://`` the ``ssh`` client runs with ``-i ssh_key -o IdentitiesOnly=yes
-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=ssh_known_hosts``.
"""

from __future__ import annotations

import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from dulwich.errors import GitProtocolError, HangupException
from dulwich.objects import Blob, ObjectID, Tree

from edge_core.errors import FetchError
from edge_core.gitlimits import CorruptObject, Deadline, FetchLimits, HeaderReader
from edge_core.text import one_line

__all__ = ["HaveWalker", "PackSpool", "PackTooLarge", "SourceAuth", "causes", "is_own_bug", "is_want_refused",
           "redact", "transport_reason", "tree_objects"]
_MODE_TREE = 0o040000
_MODE_GITLINK = 0o160000


@dataclass(frozen=True)
class SourceAuth:
    """Credentials for a mirror.

    Attributes:
        token: HTTP(S) access token, sent as Basic auth with user ``x-access-token``.
        username: HTTP(S) Basic user name (ignored when ``token`` is set), or the ssh login user.
        password: HTTP(S) Basic password.
        ssh_key: private key file for ``ssh://`` mirrors.
        ssh_known_hosts: known_hosts file pinning the ``ssh://`` mirror's host key (required with ssh).
    """

    token: str | None = None
    username: str | None = None
    password: str | None = None
    ssh_key: Path | None = None
    ssh_known_hosts: Path | None = None

    def __repr__(self) -> str:
        """Show which credentials are set, never their values."""
        return (f"SourceAuth(token={'***' if self.token else None}, username={self.username!r}, "
                f"password={'***' if self.password else None}, ssh_key={self.ssh_key}, "
                f"ssh_known_hosts={self.ssh_known_hosts})")


def redact(url: str) -> str:
    """Return ``url`` without user name or password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


_BUG_TYPES = (AttributeError, TypeError, NameError, AssertionError)
_OWN_CODE = str(Path(__file__).resolve().parent) + "/"


def is_own_bug(exc: BaseException) -> bool:
    """Tell whether ``exc`` is a programming error raised in this package's own code (the innermost
    frame of its traceback is ours): it must surface, not be retried as a ``FetchError``."""
    tb = exc.__traceback__
    if not isinstance(exc, _BUG_TYPES) or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and what caused it (``__cause__``, ``__context__``, or an exception in ``reason``)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        for nxt in (cur.__cause__, cur.__context__, getattr(cur, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def transport_reason(exc: BaseException, timeout: float) -> str:
    """A short reason for a transport failure, from the most telling exception in the chain."""
    chain = list(causes(exc))
    for cur in chain:
        if isinstance(cur, ConnectionRefusedError):
            return "mirror unreachable: connection refused"
        if isinstance(cur, TimeoutError | socket.timeout):
            return f"mirror unreachable: no answer within {timeout:g}s"
        if isinstance(cur, socket.gaierror):
            return f"mirror unreachable: cannot resolve host ({one_line(cur)})"
        if type(cur).__module__ == "ssl" and isinstance(cur, OSError):  # named, not imported: TLS only
            detail = getattr(cur, "verify_message", None) or getattr(cur, "reason", None) or cur
            if type(cur).__name__ == "SSLCertVerificationError":
                return f"mirror certificate not trusted: certificate verify failed: {one_line(detail)}"
            return f"mirror TLS failed: {one_line(detail)}"
    for cur in chain:
        if isinstance(cur, ConnectionError):
            return f"mirror connection failed: {one_line(cur.strerror or cur)}"
        if isinstance(cur, OSError) and cur.strerror:
            return f"mirror unreachable: {one_line(cur.strerror)}"
    if isinstance(exc, HangupException):
        said = [line for line in (exc.stderr_lines or []) if line.strip()]
        if said:  # over ssh, the ssh client's own last word (host key refused, auth failed, ...)
            return f"mirror hung up during the fetch: {one_line(said[-1].decode('utf-8', 'replace'))}"
        return "mirror hung up during the fetch"
    if isinstance(exc, GitProtocolError):
        return f"mirror protocol error: {one_line(exc)}"
    return f"fetch failed: {type(exc).__name__}: {one_line(exc)}"



def is_want_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is the mirror refusing a want by sha ("not our ref")."""
    text = " ".join(str(cur) for cur in causes(exc)).lower()
    return "not our ref" in text or ("want" in text and ("not valid" in text or "invalid" in text))


class PackTooLarge(Exception):
    """The incoming pack passed max_bytes."""


class PackSpool:
    """Collects the incoming pack in an anonymous temporary file, bounded by a byte limit."""

    def __init__(self, directory: Path, limit: int, deadline: Deadline) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=directory, prefix="incoming-")  # noqa: SIM115
        self.limit = limit
        self.deadline = deadline
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; raise PackTooLarge past the limit."""
        self.deadline.check()
        self.size += len(data)
        if self.size > self.limit:
            raise PackTooLarge(self.size)
        self.file.write(data)
        return len(data)

    def close(self) -> None:
        """Drop the spooled pack."""
        self.file.close()


class HaveWalker:
    """Offers a fixed, small set of local commits as haves (dulwich's walker walks all history)."""

    def __init__(self, haves: list[ObjectID], shallow: set[ObjectID]) -> None:
        self._haves = list(haves)
        self.shallow = shallow

    def __next__(self) -> ObjectID | None:
        return self._haves.pop(0) if self._haves else None

    next = __next__

    def ack(self, sha: ObjectID) -> None:
        """The mirror has ``sha`` too; nothing to prune since every have is a tip."""

    def nak(self) -> None:
        """The mirror has none of the haves."""


def checked_header(headers: HeaderReader, sha: ObjectID, expected: bytes,
                   limits: FetchLimits) -> tuple[int, bool]:
    """Check the type and size of ``sha`` from its header; return its size and whether the header
    gave the type (not for a packed delta: then the caller must look at the loaded object)."""
    try:
        header = headers.header(sha)
    except CorruptObject as exc:
        raise FetchError(f"cannot read object {sha.decode('ascii')} from the mirror: {exc}") from exc
    if header is None:
        return 0, False
    kind, size = header
    if size > limits.max_object_bytes:
        raise limits.breach("max_object_bytes", f"{expected.decode()} {sha.decode('ascii')} of {size} bytes")
    if kind is not None and kind != expected:
        raise FetchError(f"tree entry {sha.decode('ascii')} is a {kind.decode()} where the tree "
                         f"says {expected.decode()}")
    return size, kind is not None


def tree_objects(store: Any, tree_sha: ObjectID, skip: set[ObjectID], limits: FetchLimits,
                  deadline: Deadline) -> set[ObjectID]:
    """Return the shas of the tree ``tree_sha`` and everything below it, not descending into ``skip``.

    Every object's type and size are checked against what its tree entry says and against
    ``max_object_bytes`` before it is loaded.
    """
    found: set[ObjectID] = set()
    stack = [tree_sha]
    total = 0
    with HeaderReader(store) as headers:
        while stack:
            deadline.check()
            sha = stack.pop()
            if sha in skip or sha in found:
                continue
            found.add(sha)
            checked_header(headers, sha, b"tree", limits)
            tree = store[sha]
            if not isinstance(tree, Tree):
                kind = tree.type_name.decode()
                raise FetchError(f"tree entry {sha.decode('ascii')} is a {kind} where the tree says tree")
            total += len(tree.as_raw_string())
            for entry in tree.iteritems():
                if entry.sha in skip or entry.sha in found:
                    continue
                if stat.S_IFMT(entry.mode) == _MODE_TREE:
                    stack.append(entry.sha)
                elif entry.mode != _MODE_GITLINK:
                    size, typed = checked_header(headers, entry.sha, b"blob", limits)
                    if not typed:
                        obj = store[entry.sha]
                        if not isinstance(obj, Blob):
                            raise FetchError(f"tree entry {entry.sha.decode('ascii')} is a "
                                             f"{obj.type_name.decode()} where the tree says blob")
                    total += size
                    found.add(entry.sha)
                if total > limits.max_inflated_bytes:
                    raise limits.breach("max_inflated_bytes", f"tree of over {total} bytes")
    return found
