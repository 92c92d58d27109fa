"""The signed webhook request: the JSON body, its HMAC-SHA256 signature in the scheme GitHub uses
(``X-Hub-Signature-256: sha256=<hex>`` over the raw body) and the other headers; and the reading of
a receiver's secret file. Pure apart from :func:`read_secret`."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleet_server import __version__
from fleet_server.errors import ServerConfigError

__all__ = ["MAX_SECRET_BYTES", "body_text", "read_secret", "request_headers", "signature"]

MAX_SECRET_BYTES = 4096


def body_text(event_id: str, event: str, at: float, data: Mapping[str, Any]) -> str:
    """Return the JSON body of one notification: ``{"id", "event", "at", "data"}``, keys sorted."""
    return json.dumps({"id": event_id, "event": event, "at": round(float(at), 3), "data": dict(data)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def signature(secret: bytes, body: bytes) -> str:
    """Return ``sha256=<hex>``: the HMAC-SHA256 of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def request_headers(*, event: str, event_id: str, body: bytes, secret: bytes | None,
                    sent_at: float) -> dict[str, str]:
    """Return the headers of one POST: content type, user agent, the event name, its id (the same on
    every retry: receivers deduplicate on it), the send time and, with a secret, the signature."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"edge-fleet-server/{__version__}",
        "X-Fleet-Event": event,
        "X-Fleet-Delivery": event_id,
        "X-Fleet-Timestamp": str(int(sent_at)),
    }
    if secret is not None:
        headers["X-Hub-Signature-256"] = signature(secret, body)
    return headers


def read_secret(path: Path, key: str) -> bytes:
    """Return the signing secret in ``path``: its first line, as bytes (``key`` names the setting in
    errors; the secret itself never appears in one).

    Raises:
        ServerConfigError: the file cannot be read, is empty or is over 4 KiB.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ServerConfigError(f"cannot read {key} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SECRET_BYTES:
        raise ServerConfigError(f"{key} {path}: over {MAX_SECRET_BYTES} bytes")
    secret = data.splitlines()[0].strip() if data.strip() else b""
    if not secret:
        raise ServerConfigError(f"{key} {path}: empty")
    return secret
