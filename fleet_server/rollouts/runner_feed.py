"""How the rollout runner turns registry rows and history reports into engine events (a part of
:class:`~.runner.RolloutRunner`; see its module docstring for where the rows come from)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleet_server.store import RolloutWrite

from .engine import report_changes
from .membership import DeviceInfo, is_targeted
from .model import DeviceJoined, DeviceOnline, DeviceReport, Event
from .runner_io import device_info
from .runner_live import Live, Registry

__all__ = ["RunnerFeed"]


class RunnerFeed:
    """Registry comparison and report filtering for :class:`~.runner.RolloutRunner`."""

    _live: dict[str, Live]
    _registry: dict[str, Registry] | None

    def _step(self, live: Live, event: Event, write: RolloutWrite) -> None:
        raise NotImplementedError

    def _registry_row(self, row: Mapping[str, Any], now: float, write: RolloutWrite, *, first: bool) -> None:
        assert self._registry is not None
        device_id = str(row["id"])
        before = self._registry.get(device_id)
        cached: Registry = (row.get("online"), row.get("release"), row.get("paused"))
        self._registry[device_id] = cached
        info: DeviceInfo | None = None
        for live in list(self._live.values()):
            if device_id not in live.state.devices and (before is None or first):
                info = info or device_info(row)
                if is_targeted(live.state.plan, info):
                    self._step(live, DeviceJoined(device_info=info, now=now), write)
        self._compare(device_id, cached, now, write)

    def _compare(self, device_id: str, cached: Registry, now: float, write: RolloutWrite) -> None:
        """Step every rollout holding ``device_id`` with what its registry row says: online or not,
        running the release it was assigned (``applied``), or paused (``deferred``)."""
        online, release, paused = cached
        for live in list(self._live.values()):
            dev = live.state.devices.get(device_id)
            if dev is None:
                continue
            if isinstance(online, bool) and online != dev.online:
                self._step(live, DeviceOnline(device=device_id, online=online, now=now), write)
                dev = live.state.devices[device_id]
            if dev.state not in ("assigned", "offline"):
                continue
            s = live.state
            wanted = s.release.version if dev.target == "new" else \
                s.previous.version if dev.target == "previous" and s.previous is not None else None
            if wanted is not None and release == wanted:
                # the status says it runs what it was assigned (a no-op sync sends no event)
                self._step(live, DeviceReport(device=device_id, now=now, outcome="applied",
                                              release_version=wanted), write)
            elif paused and dev.target == "new":
                self._step(live, DeviceReport(device=device_id, now=now, outcome="deferred",
                                              release_version=None), write)

    def _report(self, report: DeviceReport, write: RolloutWrite) -> None:
        """Step every rollout holding the device with ``report``, unless it would change nothing
        (most heartbeats): that costs O(1) and leaves advancing the clock to the tick's ``Tick``."""
        for live in list(self._live.values()):
            if report.device in live.state.devices and report_changes(live.state, report):
                self._step(live, report, write)
