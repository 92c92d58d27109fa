"""What the rollout runner turns stored rows into: engine reports from ``events`` and ``health``
rows, membership's device view of a registry row, plans from a release tree, progress groups.

Mapping of device reports to engine events (see ``docs/rollouts.md``): ``sync_succeeded`` ->
``applied``, ``sync_failed`` -> ``failed``, ``sync_refused`` -> ``refused``, ``sync_rolled_back``
-> ``rolled_back``, a ``paused`` event -> ``deferred``; a health sample with a failing check ->
``health_failed``, a passing one -> ``applied`` carrying the metrics for the telemetry gates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge_core.yamlsafe import load_yaml
from fleet_server.errors import UsageError

from .membership import DeviceInfo
from .model import DeviceReport
from .plan import RolloutPlan, parse_fleet_rollout, parse_plan

__all__ = ["PROGRESS_KEYS", "device_info", "plan_from_tree", "progress_counts", "report_from_event",
           "report_from_health"]

_EVENT_OUTCOMES = {"sync_succeeded": "applied", "sync_failed": "failed", "sync_refused": "refused",
                   "sync_rolled_back": "rolled_back", "paused": "deferred"}
PROGRESS_KEYS = ("done", "failed", "pending", "offline", "deferred", "skipped")
"""The groups of :func:`progress_counts`."""


def report_from_event(row: Mapping[str, Any], now: float) -> DeviceReport | None:
    """Turn one stored ``events`` row into the engine's :class:`DeviceReport` (None when it says nothing
    about a rollout). A ``paused`` event is ``deferred`` with no release (the lock holds whatever comes)."""
    outcome = _EVENT_OUTCOMES.get(str(row.get("type")))
    if outcome is None:
        return None
    release = row.get("release")
    version = release if isinstance(release, int) and outcome != "deferred" else None
    return DeviceReport(device=str(row["device"]), now=now, outcome=outcome, release_version=version)


def report_from_health(row: Mapping[str, Any], now: float) -> DeviceReport | None:
    """Turn one stored ``health`` sample into a :class:`DeviceReport`: ``health_failed`` when a check
    failed, else ``applied`` with the sample (metrics and checks) for the telemetry gates. None when
    the device's release is unknown."""
    release = row.get("release")
    if not isinstance(release, int):
        return None
    raw_checks = row.get("checks")
    checks: list[Any] = raw_checks if isinstance(raw_checks, list) else []
    failing = any(isinstance(c, Mapping) and c.get("ok") is False for c in checks)
    health = {"metrics": row.get("metrics") or {}, "checks": checks}
    return DeviceReport(device=str(row["device"]), now=now, outcome="health_failed" if failing else "applied",
                        release_version=release, health=health)


def plan_from_tree(tree: Mapping[str, bytes], name: str | None = None) -> RolloutPlan | None:
    """Return a plan from a verified release tree: ``rollouts/<name>.yaml`` when ``name`` is given, else
    the default plan fleet.yaml's ``rollout:`` declares (inline, or ``{plan: NAME}``); None when
    fleet.yaml declares none.

    Raises:
        UsageError: the named plan is not in the tree.
        BundleError: fleet.yaml is invalid (YamlError for malformed YAML).
        PlanError: the plan is invalid.
    """
    if name is None:
        fleet = tree.get("fleet.yaml")
        if fleet is None:
            return None
        doc = load_yaml(fleet, name="fleet.yaml").value
        declared = parse_fleet_rollout(doc.get("rollout") if isinstance(doc, Mapping) else None)
        if declared is None or isinstance(declared, RolloutPlan):
            return declared
        name = declared.name
    for suffix in (".yaml", ".yml"):
        path = f"rollouts/{name}{suffix}"
        if path in tree:
            return parse_plan(load_yaml(tree[path], name=path).value, source=path)
    raise UsageError(f"no rollout plan rollouts/{name}.yaml in the release")


def progress_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Group one wave's device states for the progress bars and charts: ``done`` (applied),
    ``failed`` (failed, refused, rolled back), ``pending`` (pending, assigned), ``offline``,
    ``deferred``, ``skipped``."""
    return {"done": counts.get("applied", 0),
            "failed": counts.get("failed", 0) + counts.get("refused", 0) + counts.get("rolled_back", 0),
            "pending": counts.get("pending", 0) + counts.get("assigned", 0),
            "offline": counts.get("offline", 0), "deferred": counts.get("deferred", 0),
            "skipped": counts.get("skipped", 0)}


def device_info(row: Mapping[str, Any]) -> DeviceInfo:
    """Return what membership needs of a registry row (id, labels, profile, online)."""
    labels = row.get("labels") if isinstance(row.get("labels"), Mapping) else {}
    return DeviceInfo(id=str(row["id"]), labels={str(k): str(v) for k, v in (labels or {}).items()},
                      profile=str(row.get("profile") or ""), online=row.get("online") is not False)
