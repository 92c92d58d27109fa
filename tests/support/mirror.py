"""Git mirrors on loopback for tests: a real `git daemon` and smart HTTP via `git http-backend`.

Both serve every bare repository under ``base_dir`` and expose ``url(repo_name)``; both are
context managers and are stopped by the process id / server object they started, never by name.

    with GitDaemon(tmp_path / "mirrors") as daemon:
        Source(daemon.url("fleet.git"), "main", cache).fetch()

``SmartHttpMirror`` can demand a token (``Authorization: Bearer <token>`` or HTTP Basic with the
token as password, any user name -> otherwise 401) and can pass the body of every
``git-upload-pack`` response through ``mangle`` (to truncate or corrupt the pack on the wire).

The pytest fixtures at the bottom (``mirror_root``, ``git_daemon``, ``http_mirror``) can be
imported into a test module: ``from tests.support.mirror import git_daemon, mirror_root``.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

__all__ = [
    "GitDaemon",
    "SilentServer",
    "SmartHttpMirror",
    "free_port",
    "git_daemon",
    "http_mirror",
    "mirror_root",
    "wait_for_port",
]

_SHA_WANT_CONFIG = {
    "GIT_CONFIG_COUNT": "2",
    "GIT_CONFIG_KEY_0": "uploadpack.allowAnySHA1InWant",
    "GIT_CONFIG_VALUE_0": "true",
    "GIT_CONFIG_KEY_1": "uploadpack.allowReachableSHA1InWant",
    "GIT_CONFIG_VALUE_1": "true",
}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> None:
    """Block until 127.0.0.1:port accepts a connection; raise RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server for port {port} exited before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class GitDaemon:
    """``git daemon`` serving every repository under ``base_dir`` on 127.0.0.1 (git://).

    Args:
        base_dir: the directory whose bare repositories are served (``url("fleet.git")``).
        allow_sha_wants: run upload-pack with uploadpack.allowAnySHA1InWant (and the reachable
            variant) so clients can fetch any commit by sha; False serves only advertised refs.
        port: a fixed port (default: a free one, kept across stop()/start()).
    """

    def __init__(self, base_dir: Path, *, allow_sha_wants: bool = True, port: int | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.allow_sha_wants = allow_sha_wants
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid_file = self.base_dir.parent / f".git-daemon-{self.port}.pid"

    def url(self, repo_name: str) -> str:
        """Return the git:// URL of ``repo_name`` (a path relative to base_dir)."""
        return f"git://127.0.0.1:{self.port}/{repo_name}"

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the daemon on ``self.port`` and wait until the port accepts connections."""
        if self._proc is not None:
            return
        env = dict(os.environ)
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        if self.allow_sha_wants:
            env.update(_SHA_WANT_CONFIG)
        argv = [
            "git", "daemon", "--reuseaddr", f"--base-path={self.base_dir}", "--export-all",
            "--enable=receive-pack", "--listen=127.0.0.1", f"--port={self.port}",
            f"--pid-file={self._pid_file}", "--informative-errors", str(self.base_dir),
        ]
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self._proc = proc
        try:
            wait_for_port(self.port, alive=lambda: proc.poll() is None)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemon (and the upload-pack children in its process group) by pid, and wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        self._pid_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _read_chunked(rfile: object) -> bytes:
    """Decode an HTTP/1.1 chunked request body from a binary reader."""
    read_line = rfile.readline  # type: ignore[attr-defined]
    read = rfile.read  # type: ignore[attr-defined]
    body = bytearray()
    while True:
        size = int(read_line().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while read_line() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(body)
        body += read(size)
        read(2)


def _split_cgi_output(output: bytes) -> tuple[bytes, bytes]:
    """Split CGI output into its header block and body (the header block ends at a blank line)."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := output.find(sep)) >= 0]
    if not ends:
        return output, b""
    at, width = min(ends)
    return output[:at], output[at + width:]


class _GitHttpHandler(BaseHTTPRequestHandler):
    """Runs `git http-backend` as a CGI program for each request."""

    server: _GitHttpServer

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: test output is for test results."""

    def do_GET(self) -> None:
        self._run_backend()

    def do_POST(self) -> None:
        self._run_backend()

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode(), token.encode())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except ValueError:
                return False
            _user, _, password = decoded.partition(":")
            return hmac.compare_digest(password.encode(), token.encode())
        return False

    def _run_backend(self) -> None:
        self.server.requests += 1
        self.server.authorization.append(self.headers.get("Authorization"))
        if not self._authorised():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="fleet mirror"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked(self.rfile)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/nonexistent"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_PROJECT_ROOT": str(self.server.base_dir),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": "fleet" if self.server.token is not None else "",
            "SERVER_PROTOCOL": "HTTP/1.0",
        }
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.server.allow_sha_wants:
            env.update(_SHA_WANT_CONFIG)
        proc = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                              timeout=60, check=False)
        head, payload = _split_cgi_output(proc.stdout)
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        if (self.server.mangle is not None and self.command == "POST"
                and path.endswith("/git-upload-pack") and status == 200):
            payload = self.server.mangle(payload)
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _GitHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], base_dir: Path, token: str | None,
                 allow_sha_wants: bool, mangle: Callable[[bytes], bytes] | None,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(address, _GitHttpHandler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.base_dir = base_dir
        self.token = token
        self.allow_sha_wants = allow_sha_wants
        self.mangle = mangle
        self.requests = 0
        self.authorization: list[str | None] = []  # the Authorization header of each request


class SmartHttpMirror:
    """A threaded HTTP server on 127.0.0.1 running `git http-backend` for ``base_dir``.

    Args:
        base_dir: the directory whose bare repositories are served.
        token: when set, requests must carry it (Bearer, or Basic with it as password) or get 401.
        allow_sha_wants: let clients fetch any commit by sha.
        mangle: a function applied to the body of each successful git-upload-pack POST response.
        tls: when set, the server speaks HTTPS with this server-side context.
    """

    def __init__(self, base_dir: Path, token: str | None = None, *, allow_sha_wants: bool = True,
                 mangle: Callable[[bytes], bytes] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.allow_sha_wants = allow_sha_wants
        self.mangle = mangle
        self._server: _GitHttpServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def url(self, repo_name: str) -> str:
        """Return the http:// (https:// with ``tls``) URL of ``repo_name``."""
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}/{repo_name}"

    @property
    def requests(self) -> int:
        """How many HTTP requests the server has seen."""
        return self._server.requests if self._server is not None else 0

    @property
    def authorization(self) -> list[str | None]:
        """The ``Authorization`` header of each request seen (None where it had none)."""
        return list(self._server.authorization) if self._server is not None else []

    def start(self) -> None:
        """Bind 127.0.0.1 on a free port (or the previous one) and serve in a background thread."""
        if self._server is not None:
            return
        server = _GitHttpServer(("127.0.0.1", self.port), self.base_dir, self.token,
                                self.allow_sha_wants, self.mangle, self.tls)
        self.port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"git-http-{self.port}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Shut the server down and wait for its thread."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers (a hung mirror)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])

    def close(self) -> None:
        """Stop listening (pending connections are reset)."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@pytest.fixture
def mirror_root(tmp_path: Path) -> Path:
    """A directory for bare mirror repositories, served by the git_daemon / http_mirror fixtures."""
    root = tmp_path / "mirrors"
    root.mkdir()
    return root


@pytest.fixture
def git_daemon(mirror_root: Path) -> Iterator[GitDaemon]:
    """A running `git daemon` serving ``mirror_root`` on a free loopback port."""
    with GitDaemon(mirror_root) as daemon:
        yield daemon


@pytest.fixture
def http_mirror(mirror_root: Path) -> Iterator[SmartHttpMirror]:
    """A running smart-HTTP mirror (no token) serving ``mirror_root`` on a free loopback port."""
    with SmartHttpMirror(mirror_root) as mirror:
        yield mirror
