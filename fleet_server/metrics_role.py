"""The replica's role as a metric: ``fleet_server_role{store="sqlite|postgresql",role="leader|follower"}``,
1 for the current role and 0 for the other, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ROLES", "RoleCollector"]

ROLES = ("leader", "follower")


class RoleCollector(Collector):
    """Reports which role this replica has on which store backend."""

    def __init__(self, store: str, role: Callable[[], str]) -> None:
        """Report ``store`` (the backend name) and the role ``role()`` returns."""
        self.store = store
        self._role = role

    def role(self) -> str:
        """Return the current role."""
        return self._role()

    def collect(self) -> Iterable[Metric]:
        """Yield the role gauge."""
        current = self._role()
        gauge = GaugeMetricFamily("fleet_server_role",
                                  "This replica's role (1 for the current one), by store.",
                                  labels=["store", "role"])
        for role in ROLES:
            gauge.add_metric([self.store, role], 1.0 if role == current else 0.0)
        yield gauge
