"""Read-only routes under ``/api/v1``: devices, one device, the fleet summary, releases, the audit log."""

from __future__ import annotations

import re
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Header, HTTPException, Query

from edge_core.messages import DEVICE_ID_RE
from fleet_server.api.auth import Tokens, require_read
from fleet_server.api.cache import CachedRead

__all__ = ["FleetReader", "fleet_router", "parse_label_filters"]

MAX_PAGE = 1000
_SYNC_STATE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_LABEL_PART = 128
_DEVICE_EVENTS = 50
_DEVICE_HEALTH = 100


class FleetReader(Protocol):
    """The store reads these routes need (``fleet_server.store.Store`` provides them)."""

    def devices(self, *, label: dict[str, str] | None = None, sync_state: str | None = None,
                online: bool | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
        """Return devices matching the filters, ordered by id."""
        ...

    def count_devices(self, *, label: dict[str, str] | None = None, sync_state: str | None = None,
                      online: bool | None = None) -> int:
        """Return how many devices match the filters."""
        ...

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return one device, or None."""
        ...

    def device_events(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Return a device's newest events first."""
        ...

    def device_health(self, device_id: str, since: float | None = None,
                      limit: int = 500) -> list[dict[str, Any]]:
        """Return a device's newest health samples first."""
        ...

    def summary(self) -> dict[str, Any]:
        """Return fleet totals."""
        ...

    def releases(self, limit: int = 50) -> list[dict[str, Any]]:
        """Return the newest recorded releases first."""
        ...

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return the newest audit entries first."""
        ...


def parse_label_filters(values: list[str]) -> dict[str, str]:
    """Turn ``["k:v", ...]`` query values into a label mapping.

    Raises:
        HTTPException: 400 for a value without ``:``, an empty or over-long key or value, or the
            same key twice.
    """
    labels: dict[str, str] = {}
    for raw in values:
        key, sep, value = raw.partition(":")
        if not sep or not key or not value or len(key) > _MAX_LABEL_PART or len(value) > _MAX_LABEL_PART:
            raise HTTPException(400, f"label filter must be key:value, got {raw[:60]!r}")
        if key in labels:
            raise HTTPException(400, f"label {key[:60]!r} is given twice")
        labels[key] = value
    return labels


def _device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id):
        raise HTTPException(400, "malformed device id")
    return device_id


def fleet_router(store: FleetReader, tokens: Tokens) -> APIRouter:
    """Build the router of the read endpoints; every one needs the read token when configured."""

    def read_access(authorization: Annotated[str | None, Header()] = None) -> None:
        require_read(tokens, authorization)

    router = APIRouter(prefix="/api/v1", dependencies=[Depends(read_access)])
    summary = CachedRead(store.summary)

    @router.get("/devices")
    def list_devices(
        label: Annotated[list[str], Query(description="label filter key:value, repeatable")] = [],  # noqa: B006
        sync_state: Annotated[str | None, Query(max_length=32)] = None,
        online: Annotated[bool | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> dict[str, Any]:
        """List devices matching every filter given, ordered by id, one page at a time."""
        labels = parse_label_filters(label)
        if sync_state is not None and not _SYNC_STATE_RE.match(sync_state):
            raise HTTPException(400, "sync_state must be a lowercase word such as in_sync")
        filters: dict[str, Any] = {"label": labels or None, "sync_state": sync_state, "online": online}
        devices = store.devices(**filters, limit=limit, offset=offset)
        return {"devices": devices, "total": store.count_devices(**filters), "limit": limit, "offset": offset}

    @router.get("/devices/{device_id}")
    def get_device(device_id: str) -> dict[str, Any]:
        """Return one device with its newest events and health samples."""
        device = store.device(_device_id(device_id))
        if device is None:
            raise HTTPException(404, f"no device {device_id}")
        return {"device": device, "events": store.device_events(device_id, limit=_DEVICE_EVENTS),
                "health": store.device_health(device_id, limit=_DEVICE_HEALTH)}

    @router.get("/summary")
    def get_summary() -> dict[str, Any]:
        """Return fleet totals: devices, by sync state, online/offline, devices per release, and when
        they were counted (``as_of``; the counts are at most a few seconds old)."""
        return summary.get()

    @router.get("/releases")
    def get_releases(limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> dict[str, Any]:
        """Return the newest signed releases the Git watcher recorded."""
        return {"releases": store.releases(limit=limit)}

    @router.get("/audit")
    def get_audit(limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict[str, Any]:
        """Return the newest audit log entries."""
        return {"audit": store.audit(limit=limit)}

    return router
