"""The HTTP health check, apart from the other checks so that urllib and its TLS stack (about
8 MB of resident memory) are loaded only by a device whose bundles declare an ``http`` check.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request

from edge_core.resources import HttpCheck

__all__ = ["http_get_status"]


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only when it stays on the same scheme, host and port."""

    def redirect_request(  # noqa: PLR0917 - the signature urllib calls
        self, req: urllib.request.Request, fp: object, code: int, msg: str,
        headers: http.client.HTTPMessage, newurl: str,
    ) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url)
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            return None  # urllib then reports the 3xx status itself
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]


def http_get_status(check: HttpCheck) -> tuple[bool, str]:
    """GET the check's URL (same-host redirects only, no proxy); healthy on the expected status."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _SameHostRedirects())
    request = urllib.request.Request(check.url, method="GET")  # noqa: S310 - scheme checked by the parser
    try:
        with opener.open(request, timeout=check.timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        exc.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"GET {check.url} failed: {reason}"
    if status != check.expect_status:
        return False, f"GET {check.url} answered {status}, expected {check.expect_status}"
    return True, f"GET {check.url} answered {status}"
