"""Prometheus metrics of webhook notifications (``docs/metrics.md``): attempts by receiver and
outcome, and deliveries by state (set by the delivery worker after each look at the store). A part of
the server's one prometheus-client adapter (:mod:`fleet_server.metrics`)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet_server.store.notification_records import DELIVERY_STATES

__all__ = ["ATTEMPT_OUTCOMES", "NotificationMetrics"]

ATTEMPT_OUTCOMES = ("delivered", "retried", "failed")
"""``delivered`` (a 2xx), ``retried`` (no 2xx, tried again later), ``failed`` (no 2xx, given up)."""


class NotificationMetrics:
    """The notification collectors, on the caller's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "fleet_notification_attempts", "Webhook delivery attempts, by receiver and outcome.",
            ["receiver", "outcome"], registry=registry)
        self.deliveries = Gauge(
            "fleet_notification_deliveries",
            "Stored webhook deliveries, by state (pending, delivered, failed).",
            ["state"], registry=registry)
        for state in DELIVERY_STATES:
            self.deliveries.labels(state=state).set(0)

    def attempted(self, receiver: str, outcome: str) -> None:
        """Count one attempt to ``receiver`` with its outcome (one of :data:`ATTEMPT_OUTCOMES`)."""
        self.attempts.labels(receiver=receiver, outcome=outcome).inc()

    def set_states(self, counts: Mapping[str, int]) -> None:
        """Set the stored deliveries by state."""
        for state in DELIVERY_STATES:
            self.deliveries.labels(state=state).set(counts.get(state, 0))
