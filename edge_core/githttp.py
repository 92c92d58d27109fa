"""The smart-HTTP transport to a Git mirror (``http://``, ``https://``): dulwich's Git protocol over
the standard library's :mod:`http.client`.

dulwich's own HTTP client runs on urllib3, which the agent would load for this alone: 1.6-1.8 MiB
of its 40 MB budget in three runs of ``bench.bench_footprint`` (docs/benchmarks.md). :mod:`http.client` and
:mod:`ssl` are already in the daemon (paho loads them), so this client subclasses dulwich's
:class:`~dulwich.client.AbstractHttpGitClient`, which leaves exactly one method to a transport:
``_http_request``. Everything else (ref discovery, negotiation, protocol v2, the pack) is
dulwich's.

What the transport does:

- **TLS** with :func:`edge_core.tls.client_context`: certificate and host name verified against
  the system's trust store, its CAs read on demand (``SSL_CERT_FILE``/``SSL_CERT_DIR`` name another
  one, as for any OpenSSL program); no way to turn verification off.
- **Credentials** (Basic: a user name and password, or a token) go only to the mirror's own origin
  (scheme, host, port); a redirect elsewhere is followed without them.
- **Redirects** of a ``GET`` (the ref discovery) are followed, at most :data:`MAX_REDIRECTS`, never
  from ``https`` to ``http``; dulwich then asks the new location for the pack. A ``POST`` is never
  redirected, as with ``git``.
- **Proxies** from the environment, as curl and git read them: ``https_proxy`` / ``http_proxy``
  (either case), ``all_proxy``, ``no_proxy``. An ``https://`` mirror is reached through a
  ``CONNECT`` tunnel; the proxy's own URL must be ``http://`` (with optional credentials).
- **Keep-alive**: one connection per origin for the requests of one fetch; a response not read to
  its end closes its connection, so a later request never reads a stale body.
- **Bounds**: ``timeout`` on connecting and on every read, shortened to what is left of the fetch's
  :class:`~edge_core.gitlimits.Deadline`, which is looked at before every request and read; the ref
  advertisement is capped in bytes as it arrives.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies_environment, proxy_bypass

from dulwich.client import AbstractHttpGitClient, HTTPUnauthorized, default_user_agent_string
from dulwich.errors import GitProtocolError, NotGitRepository

from edge_core.gitlimits import Deadline, FetchLimits
from edge_core.gittransport import redact
from edge_core.tls import client_context

__all__ = ["MAX_REDIRECTS", "HttpGitClient", "proxy_for"]

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _basic(username: str, password: str | None) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``<scheme>_proxy``, then ``all_proxy``), or
    None when there is none or ``no_proxy`` exempts the host."""
    proxies = getproxies_environment()
    scheme = urlsplit(url).scheme.lower()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy:
        return None
    host = urlsplit(url).hostname or ""
    if "no" in proxies and proxy_bypass(host):  # on Linux: the no_proxy of the environment
        return None
    return proxy


class _Response:
    """A response as dulwich expects it (``status``, ``headers``, ``content_type``,
    ``redirect_location``, ``close``); closing one not read to its end closes its connection."""

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 redirect_location: str) -> None:
        self._resp = resp
        self._conn = conn
        self.status = resp.status
        self.headers = resp.headers
        self.content_type = resp.getheader("Content-Type")
        self.redirect_location = redirect_location

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (all of it when negative)."""
        return self._resp.read(size if size >= 0 else None)

    def close(self) -> None:
        """Release the response; its connection goes too unless the body was read to its end."""
        if not self._resp.isclosed():
            self._conn.close()
        self._resp.close()


class HttpGitClient(AbstractHttpGitClient):
    """dulwich's smart-HTTP Git client on :mod:`http.client` (what it does: the module's docstring)."""

    def __init__(self, base_url: str, *, username: str | None, password: str | None, timeout: float,
                 limits: FetchLimits, deadline: Deadline) -> None:
        super().__init__(base_url, username=username, password=password)
        self._timeout = timeout
        self._limits = limits
        self._deadline = deadline
        self._home = _origin(base_url)
        self._auth = _basic(username, password) if username is not None else None
        self._user_agent = default_user_agent_string()
        self._connections: dict[Origin, http.client.HTTPConnection] = {}
        self._proxied: dict[Origin, dict[str, str]] = {}  # plain-HTTP origins asked through a proxy
        self._tls: ssl.SSLContext | None = None  # one context for every connection of this client

    def close(self) -> None:
        """Close every connection this client opened."""
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            with contextlib.suppress(OSError):
                conn.close()
        super().close()

    def _connection(self, url: str) -> http.client.HTTPConnection:
        origin = _origin(url)
        conn = self._connections.get(origin)
        if conn is None:
            conn = self._connect(url, origin)
            self._connections[origin] = conn
        return conn

    def _connect(self, url: str, origin: Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if scheme not in _DEFAULT_PORTS or not host:
            raise GitProtocolError(f"cannot fetch from {redact(url)}: not an http(s) URL with a host")
        timeout = self._time_left()
        proxy = proxy_for(url)
        if proxy is None:
            if scheme == "https":
                return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context())
            return http.client.HTTPConnection(host, port, timeout=timeout)
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if via.scheme.lower() != "http" or not via.hostname:
            raise GitProtocolError(f"unsupported proxy {redact(proxy)}: only http:// proxies are supported")
        headers: dict[str, str] = {}
        if via.username is not None:
            headers["Proxy-Authorization"] = _basic(unquote(via.username), unquote(via.password or ""))
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                via.hostname, via.port or 80, timeout=timeout, context=self._tls_context())
            conn.set_tunnel(host, port, headers=headers)
            return conn
        self._proxied[origin] = headers  # absolute URIs to the proxy, with its credentials
        return http.client.HTTPConnection(via.hostname, via.port or 80, timeout=timeout)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = client_context()
        return self._tls

    def _time_left(self) -> float:
        return max(0.001, min(self._timeout, self._deadline.remaining()))

    def _send(self, method: str, url: str, headers: dict[str, str],
              body: bytes | None) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        self._deadline.check()
        origin = _origin(url)
        conn = self._connection(url)
        sent = dict(headers)
        if self._auth is not None and origin == self._home:
            sent["Authorization"] = self._auth
        target = url
        if origin in self._proxied:
            sent.update(self._proxied[origin])
        else:
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.timeout = self._time_left()  # a connection opened again (keep-alive ended) uses it
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        try:
            conn.request(method, target, body=body, headers=sent)
            return conn.getresponse(), conn
        except http.client.HTTPException as exc:
            conn.close()
            raise GitProtocolError(f"HTTP: {type(exc).__name__}: {exc}") from exc
        except OSError:
            conn.close()
            raise

    def _http_request(self, url: str, headers: dict[str, str] | None = None,
                      data: bytes | Iterator[bytes] | None = None,
                      raise_for_status: bool = True) -> tuple[Any, Callable[[int], bytes]]:
        body = data if data is None or isinstance(data, bytes) else b"".join(data)
        method = "GET" if body is None else "POST"
        base = {"User-Agent": self._user_agent, "Pragma": "no-cache", **(headers or {})}
        if body is not None:
            base["Content-Length"] = str(len(body))
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            resp, conn = self._send(method, current, base, body)
            location = resp.getheader("Location")
            if method != "GET" or resp.status not in _REDIRECTS or not location:
                break
            _Response(resp, conn, "").close()
            target = urljoin(current, location)
            if _origin(target)[0] not in _DEFAULT_PORTS:
                raise GitProtocolError(f"redirect to an unsupported URL {redact(target)}")
            if _origin(current)[0] == "https" and _origin(target)[0] == "http":
                raise GitProtocolError(f"redirect from https to http refused ({redact(target)})")
            current = target
        else:
            raise GitProtocolError(f"more than {MAX_REDIRECTS} redirects from {redact(url)}")
        wrapped = _Response(resp, conn, current if current != url else "")
        if not raise_for_status or wrapped.status == 200:
            advertisement = "info/refs" in url or (body is not None and b"command=ls-refs" in body)
            return wrapped, self._bounded(wrapped, conn, advertisement)
        status = wrapped.status
        challenge = wrapped.headers.get("WWW-Authenticate")
        wrapped.close()
        if status == 401:
            raise HTTPUnauthorized(challenge, url)
        if status == 404:
            raise NotGitRepository(f"no repository at {redact(url)}")
        raise GitProtocolError(f"unexpected HTTP status {status}")

    def _bounded(self, resp: _Response, conn: http.client.HTTPConnection,
                 advertisement: bool) -> Callable[[int], bytes]:
        limits, deadline = self._limits, self._deadline
        received = 0

        def bounded(size: int) -> bytes:
            nonlocal received
            deadline.check()
            if conn.sock is not None:
                conn.sock.settimeout(self._time_left())
            try:
                data = resp.read(size)
            except http.client.HTTPException as exc:  # IncompleteRead: the mirror stopped mid-body
                raise GitProtocolError(f"HTTP: {type(exc).__name__}: {exc}") from exc
            received += len(data)
            if advertisement and received > limits.max_ref_advertisement_bytes:
                raise limits.breach("max_ref_advertisement_bytes", "ref advertisement size")
            return data
        return bounded
