"""The dulwich clients of the network transports to a Git mirror (git://, http(s)://, ssh://),
each bounded by the fetch's limits and deadline; imported by :func:`edge_core.gitfetch.transfer`,
the first time a fetch talks to a mirror over the network (or fetches history from a local one).

Every client built by :func:`make_client` is bounded by :class:`~edge_core.gitlimits.FetchLimits`:
each read looks at the fetch's :class:`~edge_core.gitlimits.Deadline` first (``git://`` also
shortens its socket timeout to the time left), and the ref advertisement is capped in lines and
bytes while it arrives (over HTTP the advertisement responses are capped in bytes, and the ref count
is checked when the advertisement is complete). Credentials: :class:`edge_core.gittransport.SourceAuth`.

Timeouts: ``timeout`` bounds connecting and every read on ``git://`` and ``http(s)://`` (socket
timeouts); over ssh it is the ssh ``ConnectTimeout`` plus server-alive probes. The HTTP client is
:class:`edge_core.githttp.HttpGitClient`.
"""

from __future__ import annotations

import contextlib
import select
import shlex
import socket
from collections.abc import Callable
from typing import IO
from urllib.parse import urlsplit

from dulwich.client import (
    GitClient,
    LocalGitClient,
    SSHGitClient,
    SubprocessSSHVendor,
    SubprocessWrapper,
    TCPGitClient,
)
from dulwich.errors import GitProtocolError
from dulwich.protocol import DEFAULT_GIT_PROTOCOL_VERSION_FETCH, DEFAULT_GIT_PROTOCOL_VERSION_SEND, Protocol

from edge_core.errors import FetchError
from edge_core.githttp import HttpGitClient
from edge_core.gitlimits import Deadline, FetchLimits, guard_protocol
from edge_core.gittransport import SourceAuth, redact

__all__ = ["make_client"]

_TOKEN_USER = "x-access-token"  # noqa: S105 - a fixed user name, not a secret


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
        return HttpGitClient(redact(url), username=username, password=password, timeout=timeout,
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
