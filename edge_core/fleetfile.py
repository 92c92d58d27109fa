"""``fleet.yaml``: fleet-wide defaults (reconcile intervals, the default rollout plan)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_core.durations import parse_seconds
from edge_core.errors import BundleError

__all__ = ["FleetDefaults", "collect_fleet_file", "parse_duration", "parse_fleet_file"]

Where = tuple[str | int, ...]

_MAX_INTERVAL = 7 * 86400
_TOP_KEYS = frozenset({"reconcile", "rollout", "description"})
_RECONCILE_KEYS = frozenset({"poll_interval", "drift_interval"})


@dataclass(frozen=True)
class FleetDefaults:
    """Fleet-wide defaults; intervals in whole seconds. ``rollout`` is the opaque default plan."""

    poll_interval: int = 300
    drift_interval: int = 60
    rollout: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


def parse_duration(value: object, where: Where = (), *, maximum: int = _MAX_INTERVAL) -> int:
    """Return ``value`` ("30s", "5m", "1h30m", "2d" or whole seconds) as seconds, from 1 to ``maximum``.

    Raises:
        BundleError: not a duration, zero, or above ``maximum``.
    """
    try:
        exact = parse_seconds(value)
    except ValueError as exc:
        raise BundleError(f"{value!r} is not a duration like 30s, 5m, 1h or whole seconds", where) from exc
    if exact != int(exact):
        raise BundleError(f"{value!r} is not a whole number of seconds", where)
    seconds = int(exact)
    if seconds < 1 or seconds > maximum:
        raise BundleError(f"duration must be from 1s to {maximum}s, got {seconds}s", where)
    return seconds


def parse_fleet_file(value: object) -> FleetDefaults:
    """Parse a loaded ``fleet.yaml``; an empty document gives the defaults.

    Raises:
        BundleError: the first problem, with ``where``.
    """
    defaults, problems = collect_fleet_file(value)
    if problems:
        raise problems[0]
    return defaults


def collect_fleet_file(value: object) -> tuple[FleetDefaults, list[BundleError]]:
    """Parse a loaded ``fleet.yaml``; return the defaults and every format problem (empty when valid)."""
    problems: list[BundleError] = []
    if value is None:
        return FleetDefaults(), problems
    if not isinstance(value, Mapping):
        return FleetDefaults(), [BundleError("fleet.yaml must be a mapping")]
    for k in sorted(str(k) for k in value if k not in _TOP_KEYS):
        problems.append(BundleError(f"unknown key {k!r} (known: description, reconcile, rollout)", (k,)))
    intervals = {"poll_interval": 300, "drift_interval": 60}
    reconcile = value.get("reconcile") or {}
    if not isinstance(reconcile, Mapping):
        problems.append(BundleError("'reconcile' must be a mapping", ("reconcile",)))
        reconcile = {}
    for k in sorted(str(k) for k in reconcile if k not in _RECONCILE_KEYS):
        problems.append(BundleError(f"unknown key {k!r} (known: drift_interval, poll_interval)",
                                    ("reconcile", k)))
    for k in intervals:
        if reconcile.get(k) is not None:
            try:
                intervals[k] = parse_duration(reconcile[k], ("reconcile", k))
            except BundleError as exc:
                problems.append(exc)
    rollout = value.get("rollout") or {}
    if not isinstance(rollout, Mapping):
        problems.append(BundleError("'rollout' must be a mapping (the default rollout plan)", ("rollout",)))
        rollout = {}
    description = value.get("description", "")
    if not isinstance(description, str):
        problems.append(BundleError("'description' must be a string", ("description",)))
        description = ""
    return FleetDefaults(poll_interval=intervals["poll_interval"], drift_interval=intervals["drift_interval"],
                         rollout=dict(rollout), description=description), problems
