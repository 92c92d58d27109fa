"""Desired states and resources built directly, for tests that call the planner without a release."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from edge_agent.drivers.base import Context
from edge_core.release import DesiredState
from edge_core.resources import (
    File,
    Resource,
)

UNIT_TEXT = b"[Service]\nExecStart=/bin/true\n"


def desired_state(resources: Sequence[Resource], payloads: dict[str, bytes] | None = None,
                  checks: tuple = ()) -> DesiredState:
    """A DesiredState built directly (no release parsing)."""
    return DesiredState(bundles=("base",), resources=tuple(resources), checks=checks,
                        payloads=dict(payloads or {}))


def ctx_for(ctx: Context, desired: DesiredState) -> Context:
    return replace(ctx, payloads=desired.payloads)


def file_res(path: str, content: bytes, payloads: dict[str, bytes], *, mode: int | None = 0o644) -> File:
    res = File(id=f"file:{path}", bundle="base", path=path, mode=mode, content=content.decode())
    payloads[res.id] = content
    return res
