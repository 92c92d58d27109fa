"""One webhook POST with the standard library's ``http.client``: bounded by a timeout on the
connection and on each read, the answer's body read at most 64 KiB, no redirect followed, no proxy.
Every failure becomes a one-line reason; nothing here raises."""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PostResult", "post"]

_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class PostResult:
    """What one POST got: the HTTP status (None: no answer) and, unless it was a 2xx, why not."""

    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return self.error is None


def post(url: str, body: bytes, headers: Mapping[str, str], *, timeout: float) -> PostResult:
    """POST ``body`` to ``url`` and return the status, or why there is none."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=dict(headers))
        answer = conn.getresponse()
        answer.read(_MAX_ANSWER)
        status = answer.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return PostResult(None, f"no answer from {host}: {reason[:200]}")
    finally:
        conn.close()
    if 200 <= status < 300:
        return PostResult(status, None)
    return PostResult(status, f"{host} answered HTTP {status}")
