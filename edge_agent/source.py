"""Fetching releases from a Git mirror into a local cache: the only module that imports dulwich.

The cache is a bare repository in ``cache_dir``. ``Source.fetch`` asks the mirror for one revision
(the commit the fleet server assigned, else the branch head) with a shallow fetch (``depth``, 1 by
default) and offers the commits the cache already holds as "haves", so only missing objects travel.

Guarantees:

* The pack is spooled to an anonymous temporary file while it arrives, counted, and the download is
  aborted as soon as it exceeds ``max_bytes``. Only a complete pack whose checksum and every object
  verify is moved into the object store (dulwich's ``add_thin_pack`` writes the pack and its index
  under a temporary name and renames them in last), and refs move only after that. A refused,
  truncated or corrupt pack therefore leaves the cache exactly as it was.
* Any commit sha is fetchable when the mirror allows it (``uploadpack.allowAnySHA1InWant`` or
  ``allowReachableSHA1InWant``; protocol v2 servers allow reachable shas by default). When the
  mirror refuses the want, ``fetch`` falls back to fetching the branch head ``fallback_depth``
  commits deep and looks for the sha there; it raises FetchError when it is not found.
* A sha already present in the cache is answered from the cache without contacting the mirror
  (objects are content-addressed, so a present commit cannot be stale).
* Every dulwich, socket and OS failure leaves as :class:`FetchError` with a one-line reason that
  names the mirror URL (credentials removed); malformed trees raise :class:`FileIntegrityError`.

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
import logging
import re
import select
import shlex
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
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
from dulwich.file import FileLocked
from dulwich.objects import Blob, Commit, ObjectID, Tree
from dulwich.pack import write_pack_from_container
from dulwich.protocol import DEFAULT_GIT_PROTOCOL_VERSION_FETCH, DEFAULT_GIT_PROTOCOL_VERSION_SEND, Protocol
from dulwich.refs import Ref
from dulwich.repo import Repo

from edge_agent.errors import FetchError, FileIntegrityError

__all__ = ["FetchResult", "MiB", "Source", "SourceAuth"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_BRANCH_RE = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)[A-Za-z0-9._/-]+(?<![/.])$")
_LAST_FETCHED_REF = Ref(b"refs/edge-fleet/last-fetched")
_MODE_TREE = 0o040000
_MODE_SYMLINK = 0o120000
_MODE_GITLINK = 0o160000
_TOKEN_USER = "x-access-token"  # noqa: S105 - a fixed user name, not a secret

_ShallowUpdate = tuple[set[ObjectID] | None, set[ObjectID] | None]


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


@dataclass(frozen=True)
class FetchResult:
    """What one fetch did.

    Attributes:
        commit: hex sha of the fetched revision (now in the cache).
        bytes_received: pack bytes that came over the wire (0 when up to date).
        up_to_date: the cache already held the revision; nothing was transferred.
    """

    commit: str
    bytes_received: int
    up_to_date: bool


class _PackTooLarge(Exception):
    """Internal: the incoming pack passed max_bytes."""


class _WantRefused(Exception):
    """Internal: the mirror does not allow fetching the wanted sha directly."""


class _BranchMissing(Exception):
    """Internal: the mirror has no such branch."""


class _PackSpool:
    """Collects the incoming pack in an anonymous temporary file, bounded by a byte limit."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=directory, prefix="incoming-")  # noqa: SIM115
        self.limit = limit
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise _PackTooLarge(self.size)
        self.file.write(data)
        return len(data)

    def close(self) -> None:
        self.file.close()


class _HaveWalker:
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


class _TimeoutTCPGitClient(TCPGitClient):
    """dulwich's git:// client with a socket timeout on connect and on every read."""

    def __init__(self, host: str, port: int | None, timeout: float) -> None:
        super().__init__(host, port=port)
        self._timeout = timeout
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
        sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
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
                 key_filename: str | None, ssh_command: str) -> None:
        super().__init__(host, port=port, username=username, vendor=vendor, key_filename=key_filename,
                         ssh_command=ssh_command)
        self._tracking_vendor = vendor
        self._protocols: list[Protocol] = []

    def _connect(self, cmd: bytes, path: str | bytes,
                 protocol_version: int | None = None,
                 ) -> tuple[Protocol, Callable[[], bool], IO[bytes] | None]:
        proto, can_read, stderr = super()._connect(cmd, path, protocol_version)
        self._protocols.append(proto)
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
    """dulwich's urllib3 client, closing the response of a failed request instead of leaking it."""

    def _http_request(self, url: str, headers: dict[str, str] | None = None, data: Any = None,
                      raise_for_status: bool = True) -> tuple[Any, Callable[[int], bytes]]:
        resp, read = super()._http_request(url, headers, data, raise_for_status=False)
        if not raise_for_status or resp.status == 200:
            return resp, read
        status = resp.status
        challenge = resp.headers.get("WWW-Authenticate")
        resp.close()
        if status == 401:
            raise HTTPUnauthorized(challenge, url)
        if status == 404:
            raise NotGitRepository(f"no repository at {url}")
        raise GitProtocolError(f"unexpected HTTP status {status}")


def _redact(url: str) -> str:
    """Return ``url`` without user name or password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _causes(exc: BaseException) -> Iterator[BaseException]:
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


def _one_line(text: object, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _transport_reason(exc: BaseException, timeout: float) -> str:
    """A short reason for a transport failure, from the most telling exception in the chain."""
    chain = list(_causes(exc))
    for cur in chain:
        if isinstance(cur, ConnectionRefusedError):
            return "mirror unreachable: connection refused"
        if isinstance(cur, TimeoutError | socket.timeout):
            return f"mirror unreachable: no answer within {timeout:g}s"
        if isinstance(cur, socket.gaierror):
            return f"mirror unreachable: cannot resolve host ({_one_line(cur)})"
        if type(cur).__name__ in ("ReadTimeoutError", "ConnectTimeoutError"):
            return f"mirror unreachable: no answer within {timeout:g}s"
        if type(cur).__name__ == "NewConnectionError":
            return f"mirror unreachable: {_one_line(cur)}"
    for cur in chain:
        if isinstance(cur, ConnectionError):
            return f"mirror connection failed: {_one_line(cur.strerror or cur)}"
        if isinstance(cur, OSError) and cur.strerror:
            return f"mirror unreachable: {_one_line(cur.strerror)}"
    if isinstance(exc, HangupException):
        said = [line for line in (exc.stderr_lines or []) if line.strip()]
        if said:  # over ssh, the ssh client's own last word (host key refused, auth failed, ...)
            return f"mirror hung up during the fetch: {_one_line(said[-1].decode('utf-8', 'replace'))}"
        return "mirror hung up during the fetch"
    if isinstance(exc, GitProtocolError):
        return f"mirror protocol error: {_one_line(exc)}"
    return f"fetch failed: {type(exc).__name__}: {_one_line(exc)}"


def _tree_objects(store: Any, tree_sha: ObjectID, skip: set[ObjectID]) -> set[ObjectID]:
    """Return the shas of the tree ``tree_sha`` and everything below it, not descending into ``skip``."""
    found: set[ObjectID] = set()
    stack = [tree_sha]
    while stack:
        sha = stack.pop()
        if sha in skip or sha in found:
            continue
        found.add(sha)
        tree = store[sha]
        for entry in tree.iteritems():
            if entry.sha in skip or entry.sha in found:
                continue
            if stat.S_IFMT(entry.mode) == _MODE_TREE:
                stack.append(entry.sha)
            elif entry.mode != _MODE_GITLINK:
                found.add(entry.sha)
    return found


def _is_want_refused(exc: BaseException) -> bool:
    text = " ".join(str(cur) for cur in _causes(exc)).lower()
    return "not our ref" in text or ("want" in text and ("not valid" in text or "invalid" in text))


class Source:
    """A Git mirror and the local cache its releases are fetched into.

    Args:
        url: ``file://`` URL or plain path, ``git://``, ``http(s)://`` or ``ssh://`` URL.
        branch: the branch whose head is fetched when no revision is assigned.
        cache_dir: where the bare cache repository lives (created on first use).
        max_bytes: largest pack accepted from the mirror in one fetch.
        depth: history depth fetched (1 = only the wanted commit; 0 = full history).
        auth: credentials, see :class:`SourceAuth`.
        timeout: seconds allowed for connecting and for each read.
        fallback_depth: how deep to fetch the branch when the mirror refuses a want by sha.

    Raises:
        ValueError: an argument is out of range or the URL scheme is not supported.
    """

    def __init__(self, url: str, branch: str, cache_dir: Path, *, max_bytes: int = 256 * MiB,
                 depth: int = 1, auth: SourceAuth | None = None, timeout: float = 30.0,
                 fallback_depth: int = 256) -> None:
        if not _BRANCH_RE.match(branch) or branch.endswith(".lock"):
            raise ValueError(f"invalid branch name {branch!r}")
        if max_bytes <= 0 or depth < 0 or timeout <= 0 or fallback_depth < 1:
            raise ValueError("max_bytes and timeout must be positive, depth >= 0, fallback_depth >= 1")
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("", "file", "git", "http", "https", "ssh"):
            raise ValueError(f"unsupported mirror URL scheme {scheme!r}")
        if scheme == "ssh" and (auth is None or auth.ssh_known_hosts is None):
            raise ValueError("an ssh:// mirror needs auth.ssh_known_hosts to pin its host key")
        self.url = url
        self.branch = branch
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.depth = depth
        self.auth = auth or SourceAuth()
        self.timeout = timeout
        self.fallback_depth = fallback_depth
        self._scheme = scheme
        self._display_url = _redact(url)
        self._repo: Repo | None = None

    # -- cache --------------------------------------------------------------------------------

    def _open_repo(self) -> Repo:
        if self._repo is not None:
            return self._repo
        try:
            if (self.cache_dir / "HEAD").exists():
                repo = Repo(str(self.cache_dir))
            else:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                repo = Repo.init_bare(str(self.cache_dir))
                repo.refs.set_symbolic_ref(Ref(b"HEAD"), self._branch_ref)
        except (OSError, NotGitRepository, ValueError, KeyError) as exc:
            raise FetchError(f"cache repository unusable: {_one_line(exc)} ({self.cache_dir})") from exc
        self._repo = repo
        return repo

    @property
    def _branch_ref(self) -> Ref:
        return Ref(b"refs/heads/" + self.branch.encode("utf-8"))

    @staticmethod
    def _has_commit(repo: Repo, sha: ObjectID) -> bool:
        try:
            return sha in repo.object_store and isinstance(repo.object_store[sha], Commit)
        except (KeyError, ValueError, OSError):
            return False

    def _local_haves(self, repo: Repo) -> list[ObjectID]:
        haves: list[ObjectID] = []
        for ref in (self._branch_ref, _LAST_FETCHED_REF):
            try:
                sha = repo.refs[ref]
            except KeyError:
                continue
            if sha not in haves and self._has_commit(repo, sha):
                haves.append(sha)
        return haves

    # -- transport ----------------------------------------------------------------------------

    def _client(self) -> tuple[GitClient, str]:
        parts = urlsplit(self.url)
        if self._scheme in ("", "file"):
            path = parts.path if self._scheme == "file" else self.url
            return LocalGitClient(), path
        if self._scheme == "git":
            if not parts.hostname:
                raise FetchError(f"mirror URL has no host ({self._display_url})")
            return _TimeoutTCPGitClient(parts.hostname, parts.port, self.timeout), parts.path
        if self._scheme in ("http", "https"):
            username, password = self.auth.username, self.auth.password
            if self.auth.token is not None:
                username, password = _TOKEN_USER, self.auth.token
            client = _HttpGitClient(self._display_url, username=username, password=password,
                                          timeout=self.timeout)
            return client, ""
        return self._ssh_client(parts.hostname, parts.port, parts.username), parts.path

    def _ssh_client(self, host: str | None, port: int | None, user: str | None) -> GitClient:
        if not host:
            raise FetchError(f"mirror URL has no host ({self._display_url})")
        known_hosts = self.auth.ssh_known_hosts
        assert known_hosts is not None  # checked in __init__
        options = [
            "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={max(1, round(self.timeout))}",
            "-o", f"ServerAliveInterval={max(1, round(self.timeout / 3))}", "-o", "ServerAliveCountMax=3",
            "-F", "/dev/null",
        ]
        if self.auth.ssh_key is not None:
            options += ["-o", "IdentitiesOnly=yes"]
        return _SSHGitClient(
            host, port=port, username=user or self.auth.username,
            vendor=_TrackingSSHVendor(wait=max(1, round(self.timeout))),
            key_filename=str(self.auth.ssh_key) if self.auth.ssh_key is not None else None,
            ssh_command=shlex.join(options),
        )

    # -- fetch --------------------------------------------------------------------------------

    def fetch(self, want: str | None = None) -> FetchResult:
        """Bring one revision into the cache: ``want`` (a commit sha) or else the branch head.

        Returns:
            The fetched commit, the pack bytes received and whether the cache was already current.

        Raises:
            FetchError: the mirror is unreachable, refuses or fails, the pack is over ``max_bytes``,
                truncated or corrupt, or the revision does not exist there. The cache is unchanged.
        """
        want_sha: ObjectID | None = None
        if want is not None:
            if not _SHA_RE.match(want):
                raise FetchError(f"assigned revision is not a full lowercase commit sha: {want[:60]!r}")
            want_sha = ObjectID(want.encode("ascii"))
        repo = self._open_repo()
        if want_sha is not None and self._has_commit(repo, want_sha):
            self._set_ref(repo, _LAST_FETCHED_REF, want_sha)
            return FetchResult(want_sha.decode("ascii"), 0, True)
        try:
            return self._fetch_once(repo, want_sha, self.depth or None, deepen=False)
        except _WantRefused as exc:
            assert want_sha is not None
            log.info("mirror refused a want by sha; fetching %s %d deep to find %s (%s)",
                     self.branch, self.fallback_depth, want, self._display_url)
            head = self._fetch_once(repo, None, max(self.fallback_depth, self.depth), deepen=True)
            if not self._has_commit(repo, want_sha):
                raise FetchError(
                    f"revision {want} not found in the last {self.fallback_depth} commits of "
                    f"{self.branch} and the mirror refuses fetching it by sha ({self._display_url})"
                ) from exc
            self._set_ref(repo, _LAST_FETCHED_REF, want_sha)
            return FetchResult(want_sha.decode("ascii"), head.bytes_received, False)

    def _fetch_once(self, repo: Repo, want: ObjectID | None, depth: int | None, *,
                    deepen: bool) -> FetchResult:
        object_dir = Path(repo.object_store.path)
        spool = _PackSpool(object_dir, self.max_bytes)
        try:
            if self._scheme in ("", "file") and depth == 1 and not deepen:
                target, requested, shallow = self._transfer_local(repo, want, spool)
            else:
                target, requested, shallow = self._transfer(repo, want, depth, deepen, spool)
            if requested and spool.size:
                self._ingest(repo, spool)
        except FetchError:
            raise
        except _PackTooLarge as exc:
            raise FetchError(
                f"pack from mirror exceeds the {self.max_bytes}-byte limit ({self._display_url})"
            ) from exc
        except _BranchMissing as exc:
            raise FetchError(f"mirror has no branch {self.branch!r} ({self._display_url})") from exc
        except HTTPUnauthorized as exc:
            raise FetchError(f"mirror refused the credentials (HTTP 401) ({self._display_url})") from exc
        except NotGitRepository as exc:
            raise FetchError(f"no repository at the mirror URL ({self._display_url})") from exc
        except _WantRefused:
            raise
        except Exception as exc:  # dulwich raises many unrelated types; translate all
            if want is not None and _is_want_refused(exc):
                raise _WantRefused(str(exc)) from exc
            raise FetchError(f"{_transport_reason(exc, self.timeout)} ({self._display_url})") from exc
        finally:
            spool.close()
        if not self._has_commit(repo, target):
            raise FetchError(f"mirror did not send commit {target.decode('ascii')} ({self._display_url})")
        if requested:
            try:
                repo.update_shallow(*shallow)
            except FileLocked as exc:
                raise FetchError("cannot record shallow commits in the cache: it is locked "
                                 f"({exc.lockfilename!r})") from exc
            except OSError as exc:
                raise FetchError(f"cannot record shallow commits in the cache: {_one_line(exc)}") from exc
        if want is None:
            self._set_ref(repo, self._branch_ref, target)
        self._set_ref(repo, _LAST_FETCHED_REF, target)
        received = spool.size if requested else 0
        log.debug("fetched %s: %d pack bytes from %s", target, received, self._display_url)
        return FetchResult(target.decode("ascii"), received, not requested)

    def _transfer(self, repo: Repo, want: ObjectID | None, depth: int | None, deepen: bool,
                  spool: _PackSpool) -> tuple[ObjectID, bool, _ShallowUpdate]:
        """Negotiate with the mirror and spool the pack; return (target, pack requested, shallow)."""
        chosen: list[ObjectID] = []
        requested: list[bool] = []
        branch_ref = self._branch_ref

        def determine_wants(refs: Mapping[Ref, ObjectID], depth: int | None = None) -> list[ObjectID]:
            target = want if want is not None else refs.get(branch_ref)
            if target is None:
                raise _BranchMissing
            chosen.append(target)
            if self._has_commit(repo, target) and not deepen:
                return []
            requested.append(True)
            return [target]

        client, path = self._client()
        try:
            walker = _HaveWalker(self._local_haves(repo), set(repo.get_shallow()))
            result = client.fetch_pack(path, determine_wants, walker, spool.write, depth=depth)
        except (HangupException, GitProtocolError, ConnectionError) as exc:
            # The mirror listed its refs, then failed before sending any pack data for a want by
            # sha: that is how git refuses an unadvertised sha ("not our ref", often as a reset).
            if want is not None and requested and spool.size == 0 and not deepen:
                raise _WantRefused(_one_line(exc)) from exc
            raise
        finally:
            self._close_client(client)
        if not chosen:
            raise _BranchMissing
        return chosen[0], bool(requested), (result.new_shallow, result.new_unshallow)

    @staticmethod
    def _close_client(client: GitClient) -> None:
        """Close the client and, for HTTP, its pooled connections (dulwich leaves them open)."""
        with contextlib.suppress(Exception):
            client.close()
        pool = getattr(client, "pool_manager", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.clear()

    def _transfer_local(self, repo: Repo, want: ObjectID | None,
                        spool: _PackSpool) -> tuple[ObjectID, bool, _ShallowUpdate]:
        """Depth-1 fetch from a repository on this machine: the wanted commit and the trees and
        blobs the cached commits lack (dulwich's own local upload-pack ignores haves when shallow).
        """
        path = urlsplit(self.url).path if self._scheme == "file" else self.url
        try:
            mirror = Repo(path)
        except NotGitRepository as exc:
            raise FetchError(f"no repository at the mirror URL ({self._display_url})") from exc
        with contextlib.closing(mirror):
            if want is None:
                try:
                    target = mirror.refs[self._branch_ref]
                except KeyError as exc:
                    raise _BranchMissing from exc
            else:
                target = want
            if self._has_commit(repo, target):
                return target, False, (None, None)
            try:
                commit = mirror.object_store[target]
            except KeyError as exc:
                raise FetchError(
                    f"mirror has no commit {target.decode('ascii')} ({self._display_url})"
                ) from exc
            if not isinstance(commit, Commit):
                raise FetchError(f"{target.decode('ascii')} is not a commit ({self._display_url})")
            present: set[ObjectID] = set()
            for have in self._local_haves(repo):
                cached = repo.object_store[have]
                assert isinstance(cached, Commit)
                present |= _tree_objects(repo.object_store, cached.tree, set())
            below = _tree_objects(mirror.object_store, commit.tree, present)
            todo: list[tuple[ObjectID, None]] = [(target, None), *((sha, None) for sha in below)]
            write_pack_from_container(spool.write, mirror.object_store, todo,
                                      object_format=mirror.object_format, other_haves=present)
            shallow: set[ObjectID] = {target} if commit.parents else set()
            return target, True, (shallow, set())

    def _ingest(self, repo: Repo, spool: _PackSpool) -> None:
        """Verify the spooled pack and move it into the object store; on failure leave nothing."""
        object_dir = Path(repo.object_store.path)
        before = {p.name for p in object_dir.glob("tmp_pack_*")}
        spool.file.seek(0)
        try:
            repo.object_store.add_thin_pack(spool.file.read, None)
        except Exception as exc:  # a corrupt pack surfaces as many dulwich/zlib types
            for leftover in object_dir.glob("tmp_pack_*"):
                if leftover.name not in before:
                    leftover.unlink(missing_ok=True)
            raise FetchError(
                f"corrupt pack from mirror: {type(exc).__name__}: {_one_line(exc)} ({self._display_url})"
            ) from exc

    @staticmethod
    def _set_ref(repo: Repo, ref: Ref, sha: ObjectID) -> None:
        try:
            repo.refs[ref] = sha
        except FileLocked as exc:
            raise FetchError(f"cannot update {ref.decode()} in the cache: it is locked ({exc.lockfilename!r})"
                             ) from exc
        except OSError as exc:
            raise FetchError(f"cannot update {ref.decode()} in the cache: {_one_line(exc)}") from exc

    def clear_stale_locks(self) -> list[str]:
        """Remove the lock files a killed fetch left in the cache (ref, packed-refs, shallow and
        HEAD locks); return their paths relative to the cache.

        Call it only while no other process can use the cache (the agent holds its apply lock):
        then every lock file found was left by a process that died holding it, and would refuse
        every later fetch.

        Raises:
            FetchError: a lock file cannot be removed.
        """
        refs = self.cache_dir / "refs"
        found = list(refs.rglob("*.lock")) if refs.is_dir() else []
        found += [self.cache_dir / n for n in ("packed-refs.lock", "shallow.lock", "HEAD.lock")
                  if (self.cache_dir / n).exists()]
        removed = []
        for path in found:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise FetchError(f"cannot remove the stale lock {path}: {exc.strerror or exc}") from exc
            removed.append(str(path.relative_to(self.cache_dir)))
        if removed:
            log.warning("removed stale lock file(s) left in the repository cache: %s", ", ".join(removed))
        return removed

    # -- reading ------------------------------------------------------------------------------

    def _commit(self, commit: str) -> Commit:
        if not _SHA_RE.match(commit):
            raise FetchError(f"not a full lowercase commit sha: {commit[:60]!r}")
        repo = self._open_repo()
        try:
            obj = repo.object_store[ObjectID(commit.encode("ascii"))]
        except KeyError as exc:
            raise FetchError(f"commit {commit} is not in the cache; fetch it first") from exc
        except Exception as exc:  # corrupt cache objects raise assorted dulwich errors
            raise FetchError(f"cannot read commit {commit} from the cache: {_one_line(exc)}") from exc
        if not isinstance(obj, Commit):
            raise FetchError(f"{commit} is a {obj.type_name.decode()}, not a commit")
        return obj

    def commit_raw(self, commit: str) -> bytes:
        """Return the raw commit object (headers, signature and message) for signature checks.

        Raises:
            FetchError: the commit is not in the cache.
        """
        return bytes(self._commit(commit).as_raw_string())

    def commit_time(self, commit: str) -> int:
        """Return the committer timestamp (seconds since the epoch) of ``commit``.

        Raises:
            FetchError: the commit is not in the cache.
        """
        return int(self._commit(commit).commit_time)

    def read_tree(self, commit: str, *, max_file_bytes: int = 16 * MiB, max_total_bytes: int = 256 * MiB,
                  max_files: int = 100_000) -> dict[str, bytes]:
        """Return every file of ``commit``'s tree as ``"dir/name" -> content``.

        Raises:
            FetchError: the commit or one of its objects is not in the cache.
            FileIntegrityError: the tree holds a symlink or submodule, a malformed name, a file
                over ``max_file_bytes``, more than ``max_files`` files or more than
                ``max_total_bytes`` in all.
        """
        root = self._commit(commit).tree
        store = self._open_repo().object_store
        files: dict[str, bytes] = {}
        total = 0
        stack: list[tuple[str, ObjectID]] = [("", root)]
        while stack:
            prefix, tree_sha = stack.pop()
            tree = self._load(store, tree_sha, Tree, prefix or "/")
            for entry in tree.iteritems():
                name, mode, sha = entry.path, entry.mode, entry.sha
                path = prefix + self._entry_name(name, prefix)
                if stat.S_IFMT(mode) == _MODE_TREE:
                    stack.append((path + "/", sha))
                    continue
                if mode == _MODE_GITLINK:
                    raise FileIntegrityError(f"submodule in the release tree cannot be verified: {path}")
                if stat.S_IFMT(mode) == _MODE_SYMLINK:
                    raise FileIntegrityError(f"symlink in the release tree cannot be verified: {path}")
                if not stat.S_ISREG(mode):
                    raise FileIntegrityError(f"unsupported entry mode {mode:o} in the release tree: {path}")
                if len(files) >= max_files:
                    raise FileIntegrityError(f"release tree has more than {max_files} files")
                data = self._load(store, sha, Blob, path).as_raw_string()
                if len(data) > max_file_bytes:
                    raise FileIntegrityError(f"{path} is {len(data)} bytes, over the {max_file_bytes} limit")
                total += len(data)
                if total > max_total_bytes:
                    raise FileIntegrityError(f"release tree is over the {max_total_bytes}-byte limit")
                files[path] = bytes(data)
        return files

    @staticmethod
    def _entry_name(name: bytes, prefix: str) -> str:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileIntegrityError(f"tree entry name under {prefix or '/'} is not UTF-8") from exc
        if text in ("", ".", "..") or "/" in text or "\0" in text:
            raise FileIntegrityError(f"malformed tree entry name {text!r} under {prefix or '/'}")
        return text

    @staticmethod
    def _load(store: Any, sha: ObjectID, kind: type[Any], where: str) -> Any:
        try:
            obj = store[sha]
        except KeyError as exc:
            raise FetchError(f"object {sha.decode('ascii')} for {where} is not in the cache") from exc
        except Exception as exc:  # corrupt cache objects raise assorted dulwich errors
            raise FetchError(f"cannot read {where} from the cache: {_one_line(exc)}") from exc
        if not isinstance(obj, kind):
            kind_name = kind.__name__.lower()
            raise FileIntegrityError(f"{where} is a {obj.type_name.decode()}, expected {kind_name}")
        return obj

    def close(self) -> None:
        """Release the cache repository's open files."""
        repo, self._repo = self._repo, None
        if repo is not None:
            repo.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

