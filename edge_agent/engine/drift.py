"""Drift: compare the device with the installed release, resource by resource.

Every desired resource the agent manages is observed and planned again; a non-empty plan is
drift. Commands are skipped (a command is an action, not a state: without guards it would plan a
run on every pass, and a ``refresh_only`` one runs only when something it watches changes), and
so are resources not yet managed (they were never applied, so they cannot have drifted). A
resource that cannot even be observed any more (for instance its parent became a symlink) is
reported as drift with the reason as ``found``.

``expected`` and ``found`` come from the drivers' change data (short descriptions such as
``sha256 ab12cd34ef56 mode 0644``); drivers never put secret content there, and for secret files
this module never falls back to anything but the change summary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.drivers.base import Change, Context, get_driver
from edge_agent.engine.plan import order_resources
from edge_core.errors import DriverError, UntrustedInputError
from edge_core.resources import CommandRes

if TYPE_CHECKING:
    from edge_agent.state import Managed
    from edge_core.release import DesiredState

__all__ = ["DriftFinding", "detect_drift"]

log = logging.getLogger(__name__)

_TEXT_MAX = 160


@dataclass(frozen=True)
class DriftFinding:
    """One managed resource that no longer matches the installed release.

    Attributes:
        resource_id: the resource.
        expected: a short description of the desired state (never secret content).
        found: a short description of what is on the device (never secret content).
        kind: the resource kind.
        actions: the actions that would correct it, in order.
    """

    resource_id: str
    expected: str
    found: str
    kind: str = ""
    actions: tuple[str, ...] = ()


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _TEXT_MAX else line[: _TEXT_MAX - 1] + "…"


def _describe(changes: list[Change]) -> tuple[str, str]:
    """Return ``(expected, found)`` from the first change that carries them, else the summaries."""
    for change in changes:
        expected, found = change.data.get("expected"), change.data.get("found")
        if isinstance(expected, str) and isinstance(found, str):
            return _short(expected), _short(found)
    summary = "; ".join(c.summary for c in changes)
    return _short(f"in sync ({summary})"), "differs"


def detect_drift(desired: DesiredState, managed: Mapping[str, Managed], ctx: Context) -> list[DriftFinding]:
    """Return one finding per managed resource of ``desired`` whose plan is not empty.

    Writes nothing. Findings come in planning order.

    Raises:
        DriverError: a kind has no driver.
    """
    findings: list[DriftFinding] = []
    for res in order_resources(desired.resources):
        if res.id not in managed:
            continue
        if isinstance(res, CommandRes):
            continue
        driver = get_driver(res.kind)
        try:
            changes = driver.plan(res, driver.observe(res, ctx), ctx)
        except (UntrustedInputError, DriverError) as exc:
            log.warning("drift: %s cannot be observed: %s", res.id, exc)
            findings.append(DriftFinding(res.id, "observable", _short(str(exc)), res.kind, ()))
            continue
        if not changes:
            continue
        expected, found = _describe(changes)
        findings.append(DriftFinding(res.id, expected, found, res.kind, tuple(c.action for c in changes)))
    if findings:
        log.info("drift in %s resources: %s", len(findings), ", ".join(f.resource_id for f in findings))
    return findings
