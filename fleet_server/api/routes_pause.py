"""``POST /api/v1/devices/{id}/pause|resume`` and ``POST /api/v1/devices/pause|resume``: the fleet
server's remote pause (:mod:`fleet_server.remote_pause`), by device id or by label selector.

Admin token; the actor is ``X-Actor`` as for rollouts. A pause needs a reason. 404 for an unknown
device, 400 for a selector that matches nothing, 503 when the broker does not take the message.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from fleet_server.api.auth import Tokens, admin_access
from fleet_server.api.bodies import Reason
from fleet_server.api.routes_fleet import FleetReader, checked_device_id, parse_label_filters
from fleet_server.api.routes_rollouts import actor_name
from fleet_server.errors import BrokerError, UsageError
from fleet_server.remote_pause import RemotePause

__all__ = ["MAX_SELECTED", "PauseBody", "SelectorPauseBody", "pause_router"]

MAX_SELECTED = 10_000
"""The most devices one selector may pause or resume at once."""


class PauseBody(BaseModel):
    """``POST /api/v1/devices/{id}/pause|resume``: why (required for a pause)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason = ""


class SelectorPauseBody(BaseModel):
    """``POST /api/v1/devices/pause|resume``: the devices whose labels match every ``key=value`` of
    ``label``, and why (required for a pause)."""

    model_config = ConfigDict(extra="forbid")

    label: Annotated[list[str], Field(min_length=1, max_length=16,
                                      description="label selectors key=value, all must match")]
    reason: Reason = ""


def pause_router(store: FleetReader, pauses: RemotePause, tokens: Tokens) -> APIRouter:
    """Build the router of the remote pause routes."""
    router = APIRouter(prefix="/api/v1/devices")
    admin = [Depends(admin_access(tokens))]

    def run(devices: list[str], action: str, reason: str, actor: str, *,
            known: bool = False) -> dict[str, Any]:
        try:
            done = pauses.set(devices, paused=action == "pause", reason=reason, actor=actor, known=known)
        except UsageError as exc:
            status = 404 if str(exc).startswith("unknown device") else 400
            raise HTTPException(status, str(exc)) from exc
        except BrokerError as exc:
            raise HTTPException(503, str(exc)) from exc
        return {"action": action, "devices": done, "reason": reason}

    @router.post("/{device_id}/{action}", dependencies=admin)
    def pause_one(device_id: str, action: str, body: PauseBody | None = None,
                  x_actor: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Pause or resume one device remotely (admin token); a pause needs a reason."""
        if action not in ("pause", "resume"):
            raise HTTPException(404, f"no device action {action[:40]!r}: pause or resume")
        device = checked_device_id(device_id)
        return run([device], action, (body or PauseBody()).reason, actor_name(x_actor))

    @router.post("/{action}", dependencies=admin)
    def pause_selected(action: str, body: SelectorPauseBody,
                       x_actor: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Pause or resume every device whose labels match the selector (admin token)."""
        if action not in ("pause", "resume"):
            raise HTTPException(404, f"no device action {action[:40]!r}: pause or resume")
        labels = parse_label_filters(body.label)
        rows = store.devices(label=labels, limit=MAX_SELECTED + 1)
        if len(rows) > MAX_SELECTED:
            raise HTTPException(400, f"the selector matches more than {MAX_SELECTED} devices")
        if not rows:
            raise HTTPException(400, "no device matches the selector")
        return run([str(r["id"]) for r in rows], action, body.reason, actor_name(x_actor), known=True)

    return router
