"""What ``GET /healthz`` answers: ``ok``, or ``degraded`` with the reasons.

The server stays up and keeps answering while degraded (the probe is a liveness check: restarting a
server that is only behind would make it further behind), so the answer is always HTTP 200 and the
verdict is in the body::

    {"status": "ok", "store": "postgresql", "role": "leader", "broker_connected": true,
     "ingest_backlog_seconds": 0.0}
    {"status": "degraded", "reasons": ["broker unreachable"], "broker_connected": false, ...}

Reasons: ``broker unreachable`` while the server's MQTT client is disconnected,
``ingest lag N s over the M s limit`` while the oldest message received and not yet committed is
older than ``ingest.max_lag``, and ``ingest process N down`` (or ``not reporting``) while one of the
ingest processes (``ingest.processes``) has exited or has sent no report for a few seconds. ``store``
is the backend (``sqlite`` or ``postgresql``) and ``role`` this replica's (``leader`` or
``follower``; absent without a leadership, in an API-only app). A server without an MQTT ingest path
(an API-only test app) reports neither ingest field and is ``ok``.
"""

from __future__ import annotations

from typing import Any

from fleet_server.metrics import IngestMetrics

__all__ = ["BROKER_UNREACHABLE", "health_status"]

BROKER_UNREACHABLE = "broker unreachable"
"""The reason given while the server's MQTT client is not connected."""


def health_status(ingest: IngestMetrics, *, max_lag: float, store: str | None = None,
                  role: str | None = None) -> dict[str, Any]:
    """Return the ``/healthz`` document for the ingest state ``ingest`` reads, with the lag limit
    ``max_lag`` seconds, the store backend ``store`` and this replica's ``role`` (when given)."""
    reasons: list[str] = []
    answer: dict[str, Any] = {}
    if store is not None:
        answer["store"] = store
    if role is not None:
        answer["role"] = role
    connected = ingest.broker_connected()
    if connected is not None:
        answer["broker_connected"] = connected
        if not connected:
            reasons.append(BROKER_UNREACHABLE)
    backlog = ingest.backlog_age()
    if backlog is not None:
        answer["ingest_backlog_seconds"] = round(backlog, 3)
        if backlog > max_lag:
            reasons.append(f"ingest lag {backlog:.1f} s over the {max_lag:g} s limit")
    reasons.extend(ingest.problems())
    if reasons:
        return {"status": "degraded", "reasons": reasons, **answer}
    return {"status": "ok", **answer}
