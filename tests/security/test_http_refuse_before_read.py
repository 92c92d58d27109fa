"""Adversarial: the HTTP server refuses before it reads, never reads a body past its cap, and does
not wait for ever on a stalled body.

The server runs for real under uvicorn in a child process (so its resident memory can be read
from ``/proc/<pid>/status``); the client streams its bodies from a loop over a raw socket, so the
test itself never holds them. The refusals are answered before any store is reached, so they run over
SQLite only; a request that gets through to the store runs on each backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet_server.config import StoreConfig
from tests.support.mirror import free_port, wait_for_port
from tests.support.postgres import Postgres
from tests.support.stores import BACKENDS, store_section

ADMIN = "admin-secret-token"
HOOK_SECRET = "webhook-shared-secret"
MIB = 1024 * 1024
CAP = 256 * 1024
_PIECE = b"x" * (64 * 1024)

_CHILD = textwrap.dedent("""
    import json
    import sys
    from pathlib import Path

    import uvicorn

    from fleet_server.api import ApiActions, create_app
    from fleet_server.config import GitConfig, HttpConfig, ServerConfig, parse_server_config
    from fleet_server.metrics import ServerMetrics
    from fleet_server.store import open_store

    root, port, cap = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    config = ServerConfig(
        http=HttpConfig(admin_token_file=root / "admin.token", max_body_bytes=cap, body_timeout=1.0),
        git=GitConfig(url="git://127.0.0.1/fleet.git", webhook_secret_file=root / "hook.token",
                      cache_dir=root / "cache"))
    store = open_store(parse_server_config({"store": json.loads(sys.argv[4])}, root).store)
    app = create_app(store, config, ServerMetrics(), actions=ApiActions(trigger_git=lambda: None))
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                  lifespan="off", access_log=False)).run()
""")


@dataclass(frozen=True)
class Server:
    """A fleet server API running in a child process."""

    pid: int
    port: int

    def memory_kib(self, field: str) -> int:
        """Return ``VmRSS`` or ``VmHWM`` (peak resident memory) of the server process, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.pid}/status")


@contextlib.contextmanager
def child_server(tmp_path: Path, store: StoreConfig, cap: int = CAP) -> Iterator[Server]:
    """Start the API over ``store`` under uvicorn in a child process on a free 127.0.0.1 port; stop it
    by pid."""
    (tmp_path / "admin.token").write_text(ADMIN + "\n")
    (tmp_path / "hook.token").write_text(HOOK_SECRET + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), str(port), str(cap),
                             json.dumps(store_section(store))], env=env)
    try:
        wait_for_port(port, timeout=20.0, alive=lambda: proc.poll() is None)
        yield Server(proc.pid, port)
    finally:
        proc.terminate()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10.0)


@dataclass(frozen=True)
class Answer:
    """What the server answered a streamed request, and how much of the body got out."""

    status: int
    body: dict[str, object]
    sent: int
    closed: bool
    """The server closed the connection after answering (instead of draining the rest of the body)."""


def _parse(raw: bytes, sent: int, closed: bool = True) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    body = json.loads(rest) if rest else {}
    return Answer(status, body, sent, closed)


def stream_post(port: int, path: str, total: int, *, token: str | None = None, chunked: bool = False,
                extra: dict[str, str] | None = None, deadline_s: float = 60.0) -> Answer:
    """POST ``total`` bytes of ``x`` to ``path`` on a keep-alive connection, piece by piece, going on
    after the server answers until it closes the connection (a server that drains the body takes it
    all); return the answer and how many body bytes got out."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    deadline = time.monotonic() + deadline_s
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            while sent < total and time.monotonic() < deadline:
                piece = _PIECE[:total - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        raw = b""
        closed = False
        try:
            while time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                raw += data
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return _parse(raw, sent, closed)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server over SQLite, for the requests refused before any store is reached."""
    root = tmp_path_factory.mktemp("http-server")
    with child_server(root, StoreConfig(path=root / "fleet.db")) as running:
        yield running


@pytest.fixture(scope="module", params=BACKENDS)
def stored_server(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server over each backend, for the requests that reach the store: SQLite's is :func:`server`."""
    if request.param == "sqlite":
        yield request.getfixturevalue("server")
        return
    pg: Postgres = request.getfixturevalue("postgres_cluster")
    store = StoreConfig(url=pg.create_database(), password_file=pg.password_file)
    with child_server(tmp_path_factory.mktemp("http-server-pg"), store) as running:
        yield running


def test_unauthenticated_100_mib_body_is_refused_before_it_is_read(server: Server) -> None:
    """The attack as found: a 100 MiB POST without a token to an admin route. It is answered 401
    from the headers alone; the server never reads the body, so its peak memory does not move."""
    peak_before = server.memory_kib("VmHWM")
    answer = stream_post(server.port, "/api/v1/devices", 100 * MIB)
    assert answer.status == 401
    assert answer.body == {"error": "admin token required"}
    assert answer.sent < 100 * MIB
    assert answer.closed
    assert server.memory_kib("VmHWM") - peak_before < 16 * 1024


def test_wrong_token_is_refused_before_the_body_is_read(server: Server) -> None:
    peak_before = server.memory_kib("VmHWM")
    answer = stream_post(server.port, "/api/v1/devices", 100 * MIB, token="not-the-token")
    assert (answer.status, answer.body) == (403, {"error": "invalid token"})
    assert answer.sent < 100 * MIB
    assert answer.closed
    assert server.memory_kib("VmHWM") - peak_before < 16 * 1024


def test_unsigned_webhook_without_token_is_refused_before_the_body_is_read(server: Server) -> None:
    answer = stream_post(server.port, "/api/v1/hooks/git", 100 * MIB)
    assert answer.status == 401
    assert answer.body == {"error": "X-Hub-Signature-256 or an admin token required"}
    assert answer.sent < 100 * MIB


def test_declared_body_over_the_cap_with_a_valid_token_is_413_at_once(server: Server) -> None:
    answer = stream_post(server.port, "/api/v1/devices", 100 * MIB, token=ADMIN)
    assert answer.status == 413
    assert answer.body == {"error": f"request body over {CAP} bytes"}
    assert answer.sent < 100 * MIB


def test_chunked_body_over_the_cap_is_413_and_reading_stops_at_the_cap(server: Server) -> None:
    peak_before = server.memory_kib("VmHWM")
    answer = stream_post(server.port, "/api/v1/devices", 100 * MIB, token=ADMIN, chunked=True)
    assert answer.status == 413
    assert answer.body == {"error": f"request body over {CAP} bytes"}
    assert answer.sent < 100 * MIB
    assert answer.closed
    assert server.memory_kib("VmHWM") - peak_before < 16 * 1024


def test_chunked_signed_webhook_over_its_cap_is_413(server: Server) -> None:
    """A signature cannot be checked before the body, so the webhook's own cap bounds what is read."""
    answer = stream_post(server.port, "/api/v1/hooks/git", 100 * MIB, chunked=True,
                         extra={"X-Hub-Signature-256": "sha256=" + "0" * 64})
    assert answer.status == 413
    assert answer.body == {"error": f"webhook body over {CAP} bytes"}
    assert answer.sent < 100 * MIB


def test_body_under_the_cap_with_the_admin_token_still_works(stored_server: Server) -> None:
    body = json.dumps({"id": "cam-07", "labels": {"site": "north"}, "reason": "x" * 1000}).encode()
    with socket.create_connection(("127.0.0.1", stored_server.port), timeout=10.0) as sock:
        sock.sendall(b"POST /api/v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     + f"Authorization: Bearer {ADMIN}\r\n\r\n".encode()
                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head = raw.split(b"\r\n", 1)[0]
    assert b" 201 " in head, raw[:300]


def test_stalled_body_is_answered_408_and_closed(server: Server) -> None:
    """Slow body: the headers promise 100 bytes, one arrives, then nothing. The server gives up after
    ``http.body_timeout`` (1 s here) instead of holding the request open."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20.0) as sock:
        sock.sendall(b"POST /api/v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
                     + f"Authorization: Bearer {ADMIN}\r\n\r\n{{".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    answer = _parse(raw, 1)
    assert answer.status == 408
    assert answer.body == {"error": "request body stalled for more than 1s"}


def test_expect_100_continue_is_answered_401_without_inviting_the_body(server: Server) -> None:
    """A client that asks before sending (``Expect: 100-continue``) is refused at once and never told
    to go on: uvicorn sends ``100 Continue`` only when the application starts reading."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10.0) as sock:
        sock.sendall(b"POST /api/v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 104857600\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 401 "), raw[:200]
    assert b"100 Continue" not in raw
    assert _parse(raw, 0).body == {"error": "admin token required"}
