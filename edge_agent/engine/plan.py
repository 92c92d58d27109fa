"""Plan a whole desired state: every resource's driver observes and plans, in dependency order.

Order of the changes (the order :mod:`edge_agent.engine.transaction` applies them in):

1. directories, parents before children;
2. files, symlinks, secret files and ``absent`` paths, in declaration order;
3. sysctl parameters;
4. systemd units (unit file, ``daemon-reload``, enable/start — as the driver plans them);
5. commands, in declaration order;
6. prune changes for resources that were managed but are no longer in the release, in the
   reverse of the order above (commands and units first, directories last, deepest first).

Watches: an entry of ``watch`` names a resource by id or by one of the device paths it writes.
A ``systemd_unit`` whose watched resources change gets one ``restart`` change placed after the
last change of those resources (and after its own), unless the unit is not meant to run
(``running: false``) or its own plan already starts or stops it. A ``command`` with
``refresh_only`` keeps its planned ``run`` only when a watched resource changes; a plain
``command`` with ``watch`` runs when a watched resource changes even if its guards say it is done.

Capability rule: every driver of a kind the plan touches is probed first; when any probe fails
the plan is empty and :attr:`Plan.unavailable` names each kind with the probe's reason, so the
release is refused as a whole before anything is observed or written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent.drivers.base import Change, Context, get_driver, probe_kinds
from edge_core.resources import CommandRes, Directory, Resource, SystemdUnit

if TYPE_CHECKING:
    from edge_agent.state import Managed
    from edge_core.release import DesiredState

__all__ = [
    "KIND_ORDER",
    "Plan",
    "make_plan",
    "order_resources",
    "plan_document",
    "render_plan",
]

log = logging.getLogger(__name__)

KIND_ORDER: Mapping[str, int] = {
    "directory": 0,
    "file": 1, "symlink": 1, "secret_file": 1, "absent": 1,
    "sysctl": 2,
    "systemd_unit": 3,
    "command": 4,
}
"""Planning rank of each resource kind; unknown kinds go between units and commands."""

_UNKNOWN_RANK = 3


@dataclass(frozen=True)
class Plan:
    """Everything one apply would do, in order.

    Attributes:
        changes: changes for the resources of the release, in apply order.
        prune: changes removing resources dropped from the release (applied after ``changes``).
        unavailable: kind -> probe reason for each driver that cannot work here (plan refused).
        in_sync: ids of desired resources that need no change.
    """

    changes: tuple[Change, ...] = ()
    prune: tuple[Change, ...] = ()
    unavailable: Mapping[str, str] = field(default_factory=dict)
    in_sync: tuple[str, ...] = ()

    @property
    def all_changes(self) -> tuple[Change, ...]:
        """The changes followed by the prune changes: the apply order."""
        return self.changes + self.prune

    @property
    def is_noop(self) -> bool:
        """True when nothing would be changed (and the plan is not refused)."""
        return not self.unavailable and not self.changes and not self.prune


def _rank(res_kind: str) -> int:
    return KIND_ORDER.get(res_kind, _UNKNOWN_RANK)


def order_resources(resources: Sequence[Resource]) -> list[Resource]:
    """Return ``resources`` in planning order (see the module docstring); stable otherwise."""
    def key(item: tuple[int, Resource]) -> tuple[int, int, int]:
        index, res = item
        depth = res.path.count("/") if isinstance(res, Directory) else 0
        return _rank(res.kind), depth, index

    return [res for _, res in sorted(enumerate(resources), key=key)]


def _watch_matches(entry: str, res: Resource) -> bool:
    return entry == res.id or entry in res.paths


def _changed_watched(watch: Iterable[str], changed: Sequence[Resource]) -> list[Resource]:
    return [res for res in changed if any(_watch_matches(w, res) for w in watch)]


def make_plan(desired: DesiredState, managed: Mapping[str, Managed], ctx: Context, *,
              probe: bool = True) -> Plan:
    """Observe every desired resource and plan the changes that bring the device in line.

    Args:
        desired: the release's resources and payloads for this device.
        managed: the resources the agent manages now (from the state database), by id.
        ctx: the driver context (its payloads must be those of ``desired``).
        probe: probe the drivers in use first (False: the caller already did, see
            :mod:`edge_agent.planning`).

    Returns:
        The plan. When a driver in use cannot work here, a plan with only ``unavailable`` set.

    Raises:
        DriverError: a kind has no driver, or a driver cannot read the device.
        ConfinementError: a resource's path is unsafe (outside the roots, behind a symlink, special).
    """
    desired_ids = {res.id for res in desired.resources}
    dropped = [m for rid, m in managed.items() if rid not in desired_ids]
    kinds = {res.kind for res in desired.resources} | {m.kind for m in dropped}
    unavailable = probe_kinds(kinds, ctx) if probe else {}
    if unavailable:
        return Plan(unavailable=dict(unavailable))

    per_resource: list[tuple[Resource, list[Change]]] = []
    changed: list[Resource] = []
    with ctx.fs.observing():  # each directory opened once for the whole plan
        for res in order_resources(desired.resources):
            driver = get_driver(res.kind)
            observed = driver.observe(res, ctx)
            planned = list(driver.plan(res, observed, ctx))
            if isinstance(res, CommandRes):
                planned = _command_changes(res, planned, _changed_watched(res.watch, changed))
            if planned:
                changed.append(res)
            per_resource.append((res, planned))

    ordered = _with_restarts(per_resource, changed)
    touched = {c.resource_id for c in ordered}
    in_sync = [res.id for res, _ in per_resource if res.id not in touched]
    prune = _prune_changes(dropped, ctx)
    log.debug("planned %s changes, %s prune changes, %s in sync", len(ordered), len(prune), len(in_sync))
    return Plan(changes=tuple(ordered), prune=tuple(prune), unavailable={}, in_sync=tuple(in_sync))


def _command_changes(res: CommandRes, planned: list[Change], triggers: list[Resource]) -> list[Change]:
    """Apply the refresh rules of a command to what its driver planned from the guards."""
    if res.refresh_only:
        return planned if triggers else []
    if planned or not triggers:
        return planned
    because = ", ".join(t.id for t in triggers)
    return [_run_change(res, f"run {res.name} (watched {because} changed)")]


def _run_change(res: CommandRes, summary: str) -> Change:
    run: list[str] | str = res.run if isinstance(res.run, str) else list(res.run)
    return Change(res.id, res.kind, "run", summary,
                  data={"name": res.name, "run": run, "timeout": res.timeout, "refresh_only": False})


def _restart_change(unit: SystemdUnit, triggers: Sequence[Resource]) -> Change:
    because = ", ".join(t.id for t in triggers)
    return Change(unit.id, unit.kind, "restart", f"restart {unit.name} (watched {because} changed)",
                  data={"name": unit.name, "unit": unit.name, "reason": "watch"})


def _with_restarts(
    per_resource: list[tuple[Resource, list[Change]]], changed: list[Resource],
) -> list[Change]:
    """Flatten the per-resource changes, inserting each triggered unit restart at its place."""
    flat: list[Change] = []
    last_index: dict[str, int] = {}
    for res, planned in per_resource:
        flat.extend(planned)
        if planned:
            last_index[res.id] = len(flat) - 1
    inserts: list[tuple[int, Change]] = []
    for res, planned in per_resource:
        if not isinstance(res, SystemdUnit) or not res.watch or res.running is False:
            continue
        triggers = [t for t in _changed_watched(res.watch, changed) if t.id != res.id]
        if not triggers or any(c.action in ("start", "stop", "restart") for c in planned):
            continue
        after = max([last_index[t.id] for t in triggers] + ([last_index[res.id]] if planned else []))
        inserts.append((after + 1, _restart_change(res, triggers)))
    for position, change in sorted(inserts, key=lambda item: item[0], reverse=True):
        flat.insert(position, change)
    return flat


def _prune_changes(dropped: Sequence[Managed], ctx: Context) -> list[Change]:
    """Plan the removal of dropped resources: the reverse planning order, deepest paths first."""
    def key(m: Managed) -> tuple[int, int, str]:
        path = m.spec.get("path")
        depth = path.count("/") if isinstance(path, str) else 0
        return -_rank(m.kind), -depth, m.resource_id

    out: list[Change] = []
    for m in sorted(dropped, key=key):
        out.extend(get_driver(m.kind).prune(m, ctx))
    return out


def _shown_diff(change: Change) -> str:
    """The diff a plan shows for ``change``: a ``secret_file`` change's is only the redaction marker."""
    if change.kind == "secret_file" and change.diff:
        return "(secret content redacted)"
    return change.diff or ""


def plan_document(plan: Plan) -> dict[str, Any]:
    """Return the plan as a JSON-ready mapping (``edge-agent plan --json``): each change with its
    resource, kind, action, summary, diff (secrets redacted as in :func:`render_plan`) and whether
    it prunes; the resources in sync; the drivers unavailable."""
    changes = [{"resource": c.resource_id, "kind": c.kind, "action": c.action, "summary": c.summary,
                "diff": _shown_diff(c), "prune": prune}
               for prune, group in ((False, plan.changes), (True, plan.prune)) for c in group]
    return {"changes": changes, "in_sync": list(plan.in_sync), "unavailable": dict(plan.unavailable),
            "noop": plan.is_noop}


def render_plan(plan: Plan) -> str:
    """Return the plan as readable text: one line per change, then its diff (secrets redacted).

    Drivers already redact secret diffs; a change of kind ``secret_file`` is shown without any
    diff text other than the redaction marker, whatever the driver put there.
    """
    if plan.unavailable:
        refused = ["refused: drivers unavailable on this device:"]
        refused += [f"  {kind}: {reason}" for kind, reason in sorted(plan.unavailable.items())]
        return "\n".join(refused) + "\n"
    if plan.is_noop:
        return f"no changes ({len(plan.in_sync)} resources in sync)\n"
    lines: list[str] = []
    for label, changes in (("", plan.changes), ("prune ", plan.prune)):
        for change in changes:
            lines.append(f"{label}{change.action:<13} {change.resource_id}: {change.summary}")
            diff = _shown_diff(change)
            if diff:
                lines.extend("    " + ln for ln in diff.rstrip("\n").splitlines())
    total = len(plan.changes) + len(plan.prune)
    lines.append(f"{total} changes ({len(plan.prune)} prune), {len(plan.in_sync)} resources in sync")
    return "\n".join(lines) + "\n"
