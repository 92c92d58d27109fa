"""Bearer tokens and webhook signatures for the HTTP API: loading the secrets and checking requests.

* State-changing calls need the admin token (``http.admin_token_file``); without that file they are
  refused (403), never open.
* Reads need the read token (``http.read_token_file``) when one is configured; the admin token is
  accepted for reads too.
* The Git webhook is accepted with a valid ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
  body>`` under ``git.webhook_secret_file``, or with the admin token.

The routes take the token through FastAPI's security scheme (:data:`bearer_scheme`, ``HTTPBearer``:
the OpenAPI document lists it under ``securitySchemes``) with :func:`admin_access` and
:func:`read_access`. Missing credentials answer 401 (with ``WWW-Authenticate: Bearer``), wrong ones 403. Every
comparison uses :func:`hmac.compare_digest`. Secrets are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet_server.errors import ServerConfigError

__all__ = [
    "MAX_SECRET_BYTES",
    "Tokens",
    "admin_access",
    "bearer_scheme",
    "bearer_token",
    "load_secret",
    "load_tokens",
    "read_access",
    "require_admin",
    "require_read",
    "signature_valid",
]

log = logging.getLogger(__name__)

MAX_SECRET_BYTES = 4096
_UNAUTHORISED_HEADERS = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, repr=False)
class Tokens:
    """The secrets the API checks requests against; ``None`` when not configured."""

    admin: bytes | None
    read: bytes | None
    webhook: bytes | None

    def __repr__(self) -> str:
        """Say which secrets are set, never their values."""
        return (f"Tokens(admin={'***' if self.admin else None}, read={'***' if self.read else None}, "
                f"webhook={'***' if self.webhook else None})")


def load_secret(path: Path | None, field: str) -> bytes | None:
    """Read a token or secret file (surrounding whitespace removed); None when ``path`` is None.

    Raises:
        ServerConfigError: the file cannot be read, is larger than :data:`MAX_SECRET_BYTES` or empty;
            the message names ``field``.
    """
    if path is None:
        return None
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ServerConfigError(f"{field}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SECRET_BYTES:
        raise ServerConfigError(f"{field}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    secret = data.strip()
    if not secret:
        raise ServerConfigError(f"{field}: {path} is empty")
    return secret


def load_tokens(admin_file: Path | None, read_file: Path | None, webhook_file: Path | None) -> Tokens:
    """Read the admin token, read token and webhook secret files that are configured.

    Raises:
        ServerConfigError: a configured file cannot be read or is empty.
    """
    return Tokens(admin=load_secret(admin_file, "http.admin_token_file"),
                  read=load_secret(read_file, "http.read_token_file"),
                  webhook=load_secret(webhook_file, "git.webhook_secret_file"))


def bearer_token(authorization: str | None) -> bytes | None:
    """Return the token of an ``Authorization: Bearer <token>`` header, or None when there is none."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip().encode("utf-8", "surrogateescape")


def _matches(given: bytes | None, expected: bytes | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(given, expected)


def require_admin(tokens: Tokens, authorization: str | None) -> None:
    """Allow a state-changing request only with the admin token.

    Raises:
        HTTPException: 403 when no admin token is configured or the token is wrong, 401 when the
            request carries no bearer token.
    """
    if tokens.admin is None:
        raise HTTPException(403, "state-changing calls are disabled: no admin token is configured")
    given = bearer_token(authorization)
    if given is None:
        raise HTTPException(401, "admin token required", headers=_UNAUTHORISED_HEADERS)
    if not _matches(given, tokens.admin):
        raise HTTPException(403, "invalid token")


def require_read(tokens: Tokens, authorization: str | None) -> None:
    """Allow a read when no read token is configured, or with the read (or admin) token.

    Raises:
        HTTPException: 401 without a bearer token, 403 with a wrong one.
    """
    if tokens.read is None:
        return
    given = bearer_token(authorization)
    if given is None:
        raise HTTPException(401, "read token required", headers=_UNAUTHORISED_HEADERS)
    if not (_matches(given, tokens.read) or _matches(given, tokens.admin)):
        raise HTTPException(403, "invalid token")


def signature_valid(secret: bytes, body: bytes, header: str | None) -> bool:
    """Return True when ``header`` is ``sha256=<hex>`` of HMAC-SHA256(secret, body)."""
    if not header or not header.startswith("sha256="):
        return False
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header.strip().encode("ascii", "replace"), expected.encode("ascii"))


bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearerToken",
    description="Authorization: Bearer <token>. State-changing calls need the admin token "
                "(http.admin_token_file); reads need the read token (http.read_token_file) when one "
                "is configured, or the admin token.")
"""The API's one security scheme; it only reads the header, :func:`require_admin` /
:func:`require_read` decide."""

Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def _header(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return None if credentials is None else f"{credentials.scheme} {credentials.credentials}"


def admin_access(tokens: Tokens) -> Callable[[HTTPAuthorizationCredentials | None], None]:
    """A route dependency that allows the request only with the admin token (:func:`require_admin`)."""
    def check(credentials: Credentials) -> None:
        require_admin(tokens, _header(credentials))
    return check


def read_access(tokens: Tokens) -> Callable[[HTTPAuthorizationCredentials | None], None]:
    """A route dependency that allows a read as :func:`require_read` says."""
    def check(credentials: Credentials) -> None:
        require_read(tokens, _header(credentials))
    return check
