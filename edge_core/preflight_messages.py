"""The two messages of a rollout's preflight (docs/rollouts.md, docs/mqtt.md), built and checked with
the same schema table as the others (:mod:`edge_core.messages`). Pure.

``<prefix>/<device>/preflight`` (server → device, retained): plan this release against the live
state and apply nothing. ``<prefix>/<device>/plan`` (device → server, QoS 1): what that plan found.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from edge_core.messages import SCHEMA_VERSION, format_ts, validate

__all__ = ["plan_message", "preflight_message"]


def preflight_message(device: str, *, revision: str, release: int, rollout_id: str,
                      ts: datetime | float) -> dict[str, Any]:
    """Build the retained ``preflight`` request of one device for the rollout ``rollout_id``.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return validate("preflight", {"schema": SCHEMA_VERSION, "ts": format_ts(ts), "device": device,
                                  "revision": revision, "release": release, "rollout_id": rollout_id})


def plan_message(device: str, *, commit: str | None, release: int | None, rollout_id: str, outcome: str,
                 changes: Mapping[str, int], prune: int, drift: int, reason: str | None,
                 ts: datetime | float) -> dict[str, Any]:
    """Build a device's ``plan`` report for a preflight: ``outcome`` (one of
    :data:`edge_core.messages.PLAN_OUTCOMES`), the changes a sync would make counted per kind, how
    many resources it would prune, how many managed resources drifted, and a refusal's reason.

    Raises:
        MessageError: a field is invalid (``bad_field``).
    """
    return validate("plan", {"schema": SCHEMA_VERSION, "ts": format_ts(ts), "device": device,
                             "commit": commit, "release": release, "rollout_id": rollout_id,
                             "outcome": outcome, "changes": dict(changes), "prune": prune, "drift": drift,
                             "reason": reason})
