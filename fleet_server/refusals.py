"""How the Git watcher's refused head commits are recorded and read back.

The watcher (:mod:`fleet_server.releases`) appends one audit entry per refused head (actor
:data:`AUDIT_ACTOR`, action :data:`AUDIT_ACTION`, target the commit, reason the one-line reason,
detail ``{"code": ..., "release": ...}``); ``GET /api/v1/releases`` and ``fleetctl release list``
show them through :func:`refused_heads`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["AUDIT_ACTION", "AUDIT_ACTOR", "refused_heads"]

AUDIT_ACTOR = "git-watcher"
"""The actor of the audit entries the Git watcher writes."""
AUDIT_ACTION = "release_refused"
"""The audit action of a refused head commit."""


def refused_heads(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the refused heads (``at``, ``commit``, ``code``, ``release``, ``reason``) that the
    watcher's audit entries record, in the order given."""
    out: list[dict[str, Any]] = []
    for e in entries:
        detail = e.get("detail")
        detail = detail if isinstance(detail, Mapping) else {}
        release = detail.get("release")
        out.append({"at": e.get("at"), "commit": e.get("target"), "code": detail.get("code"),
                    "release": release if isinstance(release, int) else None, "reason": e.get("reason")})
    return out
