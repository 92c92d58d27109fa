"""The transports to a Git mirror (git://, http(s)://, ssh://, local), the one-line reasons for
their failures, the pack spool and the object walk of a local mirror; used by
:mod:`edge_core.source`, which owns the cache.

Every client built by :func:`make_client` is bounded by :class:`~edge_core.gitlimits.FetchLimits`:
each read looks at the fetch's :class:`~edge_core.gitlimits.Deadline` first (``git://`` also
shortens its socket timeout to the time left), and the ref advertisement is capped in lines and
bytes while it arrives (over HTTP the advertisement responses are capped in bytes, and the ref count
is checked when the advertisement is complete).

Authentication (:class:`SourceAuth`): over HTTP(S) a ``token`` is sent as HTTP Basic with the user
name ``x-access-token`` and the token as password, which dulwich supports natively and scopes to
the mirror's origin (it is not sent after a redirect to another host); ``username``/``password``
are plain Basic. Over ``ssh://`` the ``ssh`` client runs with ``-i ssh_key -o IdentitiesOnly=yes
-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=ssh_known_hosts``.

Timeouts: ``timeout`` bounds connecting and every read on ``git://`` (socket timeout) and
``http(s)://`` (urllib3 timeout); over ssh it is the ssh ``ConnectTimeout`` plus server-alive
probes.
"""

from __future__ import annotations

import contextlib
import select
import shlex
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from dulwich.client import (
    GitClient,
    HTTPUnauthorized,
    LocalGitClient,
    SSHGitClient,
    SubprocessSSHVendor,
    SubprocessWrapper,
    TCPGitClient,
    Urllib3HttpGitClient,
)
from dulwich.errors import GitProtocolError, HangupException, NotGitRepository
from dulwich.objects import Blob, ObjectID, Tree
from dulwich.protocol import DEFAULT_GIT_PROTOCOL_VERSION_FETCH, DEFAULT_GIT_PROTOCOL_VERSION_SEND, Protocol

from edge_core.errors import FetchError
from edge_core.gitlimits import CorruptObject, Deadline, FetchLimits, HeaderReader, guard_protocol

__all__ = ["HaveWalker", "PackSpool", "PackTooLarge", "SourceAuth", "causes", "is_own_bug", "is_want_refused",
           "make_client", "one_line", "redact", "transport_reason", "tree_objects"]

_TOKEN_USER = "x-access-token"  # noqa: S105 - a fixed user name, not a secret
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


class _TimeoutTCPGitClient(TCPGitClient):
    """dulwich's git:// client with a socket timeout on connect and on every read."""

    def __init__(self, host: str, port: int | None, timeout: float, limits: FetchLimits,
                 deadline: Deadline) -> None:
        super().__init__(host, port=port)
        self._timeout = timeout
        self._limits = limits
        self._deadline = deadline
        self._closers: list[Callable[[], None]] = []

    def close(self) -> None:
        """Close every connection this client opened (dulwich leaks one when the handshake fails)."""
        closers, self._closers = self._closers, []
        for close in closers:
            with contextlib.suppress(OSError):
                close()

    def _connect(self, cmd: bytes, path: str | bytes,
                 protocol_version: int | None = None) -> tuple[Protocol, Callable[[], bool], None]:
        if isinstance(path, str):
            path = path.encode(self._remote_path_encoding)
        self._deadline.check()
        sock = socket.create_connection((self._host, self._port),
                                        timeout=max(0.001, min(self._timeout, self._deadline.remaining())))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb", -1)
        wfile = sock.makefile("wb", 0)

        def close() -> None:
            rfile.close()
            wfile.close()
            sock.close()

        def shutdown_write() -> None:
            wfile.flush()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

        def can_read() -> bool:
            return len(select.select([sock.fileno()], [], [], 0)[0]) > 0

        proto = Protocol(rfile.read, wfile.write, close, report_activity=self._report_activity,
                         shutdown_write=shutdown_write)
        self._closers.append(proto.close)

        def before_read(remaining: float) -> None:
            sock.settimeout(max(0.001, min(self._timeout, remaining)))

        guard_protocol(proto, self._limits, self._deadline, before_read)
        if path.startswith(b"/~"):
            path = path[1:]
        if cmd == b"upload-pack":
            self.protocol_version = (DEFAULT_GIT_PROTOCOL_VERSION_FETCH if protocol_version is None
                                     else protocol_version)
        else:
            self.protocol_version = DEFAULT_GIT_PROTOCOL_VERSION_SEND
        extra = b""
        if cmd == b"upload-pack" and self.protocol_version == 2:
            extra = b"\0\0version=%d\0" % self.protocol_version
        proto.send_cmd(b"git-" + cmd, path, b"host=" + self._host.encode("ascii") + extra)
        return proto, can_read, None


class _TrackingSSHVendor(SubprocessSSHVendor):
    """dulwich's ``ssh`` subprocess vendor, remembering every ssh process it starts.

    dulwich closes the ssh process only once the handshake succeeded; when ssh fails first (host
    key refused, key not authorized, connection refused or timed out) the process and its pipes
    were left behind. ``close_all`` ends them, waiting at most ``wait`` seconds before a kill.
    """

    def __init__(self, wait: int) -> None:
        self._wait = wait
        self._connections: list[SubprocessWrapper] = []

    def run_command(  # noqa: PLR0917 - dulwich's signature, called positionally by dulwich
            self, host: str, command: bytes, username: str | None = None, port: int | None = None,
            password: str | None = None, key_filename: str | None = None, ssh_command: str | None = None,
            protocol_version: int | None = None) -> SubprocessWrapper:
        """Start ssh as dulwich does and remember the process."""
        con = super().run_command(host, command, username=username, port=port, password=password,
                                  key_filename=key_filename, ssh_command=ssh_command,
                                  protocol_version=protocol_version)
        self._connections.append(con)
        return con

    def close_all(self) -> None:
        """Close the pipes of every ssh process started and reap it (killed after the wait)."""
        connections, self._connections = self._connections, []
        for con in connections:
            with contextlib.suppress(OSError, GitProtocolError):
                con.close(timeout=self._wait)


class _SSHGitClient(SSHGitClient):
    """dulwich's ssh client whose ``close`` also ends the ssh processes of failed handshakes."""

    def __init__(self, host: str, *, port: int | None, username: str | None, vendor: _TrackingSSHVendor,
                 key_filename: str | None, ssh_command: str, limits: FetchLimits, deadline: Deadline) -> None:
        super().__init__(host, port=port, username=username, vendor=vendor, key_filename=key_filename,
                         ssh_command=ssh_command)
        self._tracking_vendor = vendor
        self._limits = limits
        self._deadline = deadline
        self._protocols: list[Protocol] = []

    def _connect(self, cmd: bytes, path: str | bytes,
                 protocol_version: int | None = None,
                 ) -> tuple[Protocol, Callable[[], bool], IO[bytes] | None]:
        self._deadline.check()
        proto, can_read, stderr = super()._connect(cmd, path, protocol_version)
        self._protocols.append(proto)
        guard_protocol(proto, self._limits, self._deadline)
        return proto, can_read, stderr

    def close(self) -> None:
        """End every ssh process this client started (bounded), then close their protocols."""
        self._tracking_vendor.close_all()
        protocols, self._protocols = self._protocols, []
        for proto in protocols:
            with contextlib.suppress(OSError, GitProtocolError):
                proto.close()
        super().close()


class _HttpGitClient(Urllib3HttpGitClient):
    """dulwich's urllib3 client, closing the response of a failed request instead of leaking it,
    looking at the deadline before every read and capping the bytes of ref advertisements."""

    def __init__(self, base_url: str, *, username: str | None, password: str | None, timeout: float,
                 limits: FetchLimits, deadline: Deadline) -> None:
        super().__init__(base_url, username=username, password=password, timeout=timeout)
        self._limits = limits
        self._deadline = deadline

    def _http_request(self, url: str, headers: dict[str, str] | None = None, data: Any = None,
                      raise_for_status: bool = True) -> tuple[Any, Callable[[int], bytes]]:
        self._deadline.check()
        resp, read = super()._http_request(url, headers, data, raise_for_status=False)
        if not raise_for_status or resp.status == 200:
            advertisement = "info/refs" in url or (isinstance(data, bytes) and b"command=ls-refs" in data)
            return resp, self._bounded(read, advertisement)
        status = resp.status
        challenge = resp.headers.get("WWW-Authenticate")
        resp.close()
        if status == 401:
            raise HTTPUnauthorized(challenge, url)
        if status == 404:
            raise NotGitRepository(f"no repository at {url}")
        raise GitProtocolError(f"unexpected HTTP status {status}")


    def _bounded(self, read: Callable[[int], bytes], advertisement: bool) -> Callable[[int], bytes]:
        limits, deadline = self._limits, self._deadline
        received = 0

        def bounded(size: int) -> bytes:
            nonlocal received
            deadline.check()
            data = read(size)
            received += len(data)
            if advertisement and received > limits.max_ref_advertisement_bytes:
                raise limits.breach("max_ref_advertisement_bytes", "ref advertisement size")
            return data
        return bounded


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
    """Yield ``exc`` and what caused it (``__cause__``/``__context__``/urllib3's ``reason``)."""
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


def one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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
        if type(cur).__name__ in ("ReadTimeoutError", "ConnectTimeoutError"):
            return f"mirror unreachable: no answer within {timeout:g}s"
        if type(cur).__name__ == "NewConnectionError":
            return f"mirror unreachable: {one_line(cur)}"
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


def make_client(url: str, auth: SourceAuth, timeout: float, limits: FetchLimits,
                deadline: Deadline) -> tuple[GitClient, str]:
    """Return the dulwich client for ``url`` and the path to ask it for, bounded by ``limits``.

    Raises:
        FetchError: the URL has no host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        return LocalGitClient(), (parts.path if scheme == "file" else url)
    if not parts.hostname:
        raise FetchError(f"mirror URL has no host ({redact(url)})")
    if scheme == "git":
        return _TimeoutTCPGitClient(parts.hostname, parts.port, timeout, limits, deadline), parts.path
    if scheme in ("http", "https"):
        username, password = auth.username, auth.password
        if auth.token is not None:
            username, password = _TOKEN_USER, auth.token
        return _HttpGitClient(redact(url), username=username, password=password, timeout=timeout,
                              limits=limits, deadline=deadline), ""
    known_hosts = auth.ssh_known_hosts
    if known_hosts is None:
        raise FetchError(f"an ssh:// mirror needs auth.ssh_known_hosts ({redact(url)})")
    options = [
        "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={max(1, round(timeout))}",
        "-o", f"ServerAliveInterval={max(1, round(timeout / 3))}", "-o", "ServerAliveCountMax=3",
        "-F", "/dev/null",
    ]
    if auth.ssh_key is not None:
        options += ["-o", "IdentitiesOnly=yes"]
    client = _SSHGitClient(
        parts.hostname, port=parts.port, username=parts.username or auth.username,
        vendor=_TrackingSSHVendor(wait=max(1, round(timeout))),
        key_filename=str(auth.ssh_key) if auth.ssh_key is not None else None,
        ssh_command=shlex.join(options), limits=limits, deadline=deadline,
    )
    return client, parts.path


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
