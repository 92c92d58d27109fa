"""The select, probe and plan step of a sync: one verified tree -> the plan for this device, or one refusal.

Selects the bundles that target this device (:func:`edge_core.release.select`), checks every kind
in use (and every kind of a resource about to be pruned) against the device profile, probes each
driver once, and plans with :func:`edge_agent.engine.plan.make_plan` without probing again. A kind
that the profile does not allow or whose driver cannot work here refuses the whole release with one
message, built only here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edge_agent.drivers.base import Context, probe_kinds
from edge_agent.engine.plan import Plan, make_plan
from edge_agent.runtime import Runtime, with_payloads
from edge_agent.state import Managed
from edge_core.errors import DriverUnavailable
from edge_core.release import DesiredState, DeviceIdentity, select

__all__ = ["Prepared", "desired_for", "prepare", "unavailable"]


@dataclass(frozen=True)
class Prepared:
    """A release made ready to apply on this device: what it wants, the context, the plan."""

    desired: DesiredState
    ctx: Context
    managed: Mapping[str, Managed]
    plan: Plan


def desired_for(rt: Runtime, tree: Mapping[str, bytes]) -> DesiredState:
    """Return the desired state of ``tree`` for this device (its bundles, overlays applied).

    Raises:
        UntrustedInputError: a bundle is invalid or breaks the device profile's policy.
    """
    device = DeviceIdentity(id=rt.config.device_id, labels=dict(rt.config.labels), profile=rt.config.profile)
    return select(tree, device, rt.profile)


def unavailable(rt: Runtime, desired: DesiredState, managed: Mapping[str, Managed],
                ctx: Context) -> dict[str, str]:
    """Return kind -> reason for every kind in use that the profile forbids or whose probe fails."""
    kinds = {r.kind for r in desired.resources}
    pruned = {m.kind for rid, m in managed.items() if rid not in {r.id for r in desired.resources}}
    out = {k: f"the device profile {rt.profile.name} does not allow {k} resources"
           for k in sorted(kinds - set(rt.profile.drivers))}
    out.update(probe_kinds((kinds & set(rt.profile.drivers)) | pruned, ctx))
    return out


def prepare(rt: Runtime, desired: DesiredState, version: int, commit: str) -> Prepared:
    """Probe the drivers the release needs once, then plan it against the managed resources.

    Raises:
        DriverUnavailable: a kind in use is not allowed here or its driver cannot work here.
        DriverError, ConfinementError: the planner cannot observe a resource safely.
    """
    ctx = with_payloads(rt.ctx, desired.payloads, version, commit)
    managed = rt.state.managed()
    missing = unavailable(rt, desired, managed, ctx)
    if missing:
        reason = "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
        raise DriverUnavailable(f"drivers unavailable on this device: {reason}")
    plan = make_plan(desired, managed, ctx, probe=False)
    return Prepared(desired=desired, ctx=ctx, managed=managed, plan=plan)
