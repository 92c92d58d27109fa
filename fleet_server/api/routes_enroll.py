"""Enrolment: make a device known to the fleet before it ever reports.

    POST /api/v1/devices   {id, labels?, profile?, reason?} -> 201 (new) or 200 (already known)

With ``ingest.unknown_devices: refuse`` only enrolled devices are heard. Labels and a profile given
here place the device in label selectors and canary waves until its own status report carries
them (the device's report wins). Needs the admin token; recorded in the audit log with the actor
(``X-Actor``) and the reason. Enrolling a known device again is allowed: it sets what is given and
changes nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Header, Response

from fleet_server.api.auth import Tokens, admin_access
from fleet_server.api.bodies import EnrollBody
from fleet_server.api.routes_rollouts import actor_name

__all__ = ["DeviceRegistry", "enroll_router"]


class DeviceRegistry(Protocol):
    """The store calls enrolment needs (``fleet_server.store.Store`` provides them)."""

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return one device, or None."""
        ...

    def register_device(self, device_id: str, *, labels: Mapping[str, str] | None = None,
                        profile: str | None = None, now: float | None = None) -> None:
        """Make a device known, setting the labels and profile given."""
        ...

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Any = None) -> None:
        """Append one audit entry."""
        ...


def enroll_router(store: DeviceRegistry, tokens: Tokens) -> APIRouter:
    """Build the router of ``POST /api/v1/devices``."""
    router = APIRouter(prefix="/api/v1")

    @router.post("/devices", status_code=201, dependencies=[Depends(admin_access(tokens))])
    def enroll_device(body: EnrollBody, response: Response,
                      x_actor: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Enroll a device (admin token): 201 when it was unknown, 200 when it was already known."""
        actor = actor_name(x_actor)
        device_id, labels, profile, reason = body.id, body.labels, body.profile, body.reason
        known = store.device(device_id) is not None
        store.register_device(device_id, labels=labels, profile=profile)
        store.add_audit(actor, "device.enroll", device_id, reason,
                        {"labels": labels, "profile": profile, "already_known": known})
        if known:
            response.status_code = 200
        return {"device": store.device(device_id), "created": not known}

    return router
