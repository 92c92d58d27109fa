"""One resource through its registered driver: observe and plan, or snapshot and apply."""

from __future__ import annotations

from edge_agent.drivers import Context, get_driver
from edge_agent.drivers.base import Change
from edge_core.resources import Resource


def plan(res: Resource, ctx: Context) -> list[Change]:
    d = get_driver(res.kind)
    return d.plan(res, d.observe(res, ctx), ctx)


def apply(changes: list[Change], ctx: Context) -> list[list[dict[str, object]]]:
    out = []
    for c in changes:
        d = get_driver(c.kind)
        out.append(d.snapshot(c, ctx))
        d.apply(c, ctx)
    return out
