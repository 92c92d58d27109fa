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

from fastapi import APIRouter, Body, Header, HTTPException, Response

from edge_core.messages import DEVICE_ID_RE, LABEL_KEY_RE, MAX_LABEL_VALUE, MAX_LABELS, PROFILE_RE
from fleet_server.api.auth import Tokens, require_admin
from fleet_server.api.routes_rollouts import actor_name, request_reason

__all__ = ["DeviceRegistry", "enroll_request", "enroll_router"]

_FIELDS = frozenset({"id", "labels", "profile", "reason"})


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


def enroll_request(body: Mapping[str, Any]) -> tuple[str, dict[str, str] | None, str | None]:
    """Return the device id, labels and profile of an enrolment body, checked as a status report's are.

    Raises:
        HTTPException: 400 naming the first field that is missing, malformed or unknown.
    """
    unknown = sorted(str(k) for k in body if k not in _FIELDS)
    if unknown:
        raise HTTPException(400, f"unknown field(s): {', '.join(unknown)}")
    device_id = body.get("id")
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise HTTPException(400, "id must be a device id: 1-64 characters of A-Z a-z 0-9 . _ -")
    labels = body.get("labels")
    if labels is not None:
        if not isinstance(labels, Mapping) or len(labels) > MAX_LABELS:
            raise HTTPException(400, f"labels must be a mapping of at most {MAX_LABELS} name: value pairs")
        for key, value in labels.items():
            if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
                raise HTTPException(400, f"labels: invalid label name {str(key)[:60]!r}")
            if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
                raise HTTPException(400, f"labels.{key}: value must be text of at most {MAX_LABEL_VALUE} "
                                         "characters")
        labels = dict(labels)
    profile = body.get("profile")
    if profile is not None and (not isinstance(profile, str) or not PROFILE_RE.match(profile)):
        raise HTTPException(400, "profile must be a profile name: 1-64 characters of A-Z a-z 0-9 . _ -")
    return device_id, labels, profile


def enroll_router(store: DeviceRegistry, tokens: Tokens) -> APIRouter:
    """Build the router of ``POST /api/v1/devices``."""
    router = APIRouter(prefix="/api/v1")

    @router.post("/devices", status_code=201)
    def enroll_device(body: Annotated[dict[str, Any], Body()], response: Response,
                      authorization: Annotated[str | None, Header()] = None,
                      x_actor: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Enroll a device (admin token): 201 when it was unknown, 200 when it was already known."""
        require_admin(tokens, authorization)
        actor = actor_name(x_actor)
        device_id, labels, profile = enroll_request(body)
        reason = request_reason(body)
        known = store.device(device_id) is not None
        store.register_device(device_id, labels=labels, profile=profile)
        store.add_audit(actor, "device.enroll", device_id, reason,
                        {"labels": labels, "profile": profile, "already_known": known})
        if known:
            response.status_code = 200
        return {"device": store.device(device_id), "created": not known}

    return router
