"""HTTP servers that stand in front of a mirror on 127.0.0.1: a redirector and a forward proxy.

- :class:`Redirector` answers every request with a redirect to the same path under another base
  URL, and records the ``Authorization`` header of each.
- :class:`ForwardProxy` is an HTTP proxy as ``http_proxy``/``https_proxy`` name one: ``CONNECT``
  tunnels (for https) and absolute-URI requests (for plain http), each recorded.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

__all__ = ["ForwardProxy", "Redirector"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Front:
    """Serves ``handler`` on a free port of 127.0.0.1 from a background thread (TLS with ``tls``)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.front = self  # type: ignore[attr-defined]
        self.port = int(self._server.server_address[1])
        self.scheme = "https" if tls is not None else "http"
        self.seen: list[tuple[str, str, str | None]] = []  # (method, target, the credentials header)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"http-front-{self.port}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: test output is for test results."""

    @property
    def front(self) -> _Front:
        return self.server.front  # type: ignore[attr-defined,no-any-return]


class _RedirectHandler(_Quiet):
    def do_GET(self) -> None:
        self.front.seen.append((self.command, self.path, self.headers.get("Authorization")))
        self.send_response(302)
        self.send_header("Location", self.front.target.rstrip("/") + self.path)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET


class Redirector(_Front):
    """Redirects (302) every request to the same path under ``target`` (a base URL)."""

    def __init__(self, target: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(_RedirectHandler, tls)
        self.target = target

    def url(self, repo: str) -> str:
        """The URL of ``repo`` on this server."""
        return f"{self.scheme}://127.0.0.1:{self.port}/{repo}"


class _ProxyHandler(_Quiet):
    def do_CONNECT(self) -> None:
        self.front.seen.append(("CONNECT", self.path, self.headers.get("Proxy-Authorization")))
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        sockets = [self.connection, upstream]
        try:
            for _ in range(100_000):
                ready, _w, _x = select.select(sockets, [], [], 10)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is self.connection else self.connection).sendall(data)
        finally:
            upstream.close()
            self.close_connection = True

    def _forward(self) -> None:
        self.front.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization")))
        parts = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=30)
        hop_by_hop = ("proxy-authorization", "connection")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in hop_by_hop}
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(self.command, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            self.send_response(resp.status)
            for name, value in resp.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    do_GET = _forward
    do_POST = _forward


class ForwardProxy(_Front):
    """A forward HTTP proxy: ``CONNECT`` tunnels and absolute-URI requests, each recorded."""

    def __init__(self) -> None:
        super().__init__(_ProxyHandler)

    @property
    def url(self) -> str:
        """The proxy's URL, as ``http_proxy`` names it."""
        return f"http://127.0.0.1:{self.port}"
