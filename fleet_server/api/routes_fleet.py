"""Read-only routes under ``/api/v1``: devices, one device, the fleet summary, releases, the audit log."""

from __future__ import annotations

import re
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response

from edge_core.messages import DEVICE_ID_RE
from fleet_server.api.auth import Tokens, read_access
from fleet_server.api.cache import CachedRead
from fleet_server.refusals import AUDIT_ACTION as REFUSED_ACTION
from fleet_server.refusals import refused_heads
from fleet_server.store.device_order import DEVICE_SORTS, ID_PREFIX_RE

__all__ = ["FleetReader", "checked_device_id", "fleet_router", "parse_label_filters"]

MAX_PAGE = 1000
_SYNC_STATE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_LABEL_PART = 128
_LABEL_SEPARATOR = re.compile(r"[=:]")
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

    def devices_page_json(self, *, label: dict[str, str] | None = None, sync_state: str | None = None,
                          online: bool | None = None, limit: int = 100, offset: int = 0,
                          id_prefix: str | None = None, sort: str = "id", descending: bool = False) -> str:
        """Return the JSON text of the ``GET /api/v1/devices`` answer: one page of devices matching every
        filter (ids starting with ``id_prefix`` when given), ordered by ``sort`` then id, with how many
        match in all."""
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

    def audit(self, limit: int = 100, *, action: str | None = None,
              before: int | None = None) -> list[dict[str, Any]]:
        """Return the newest audit entries first (only those of ``action``, and with an id below
        ``before``, when given)."""
        ...


def _split_label_term(raw: str) -> tuple[str, str] | None:
    """Split one label filter ``key=value`` (the documented form, as in fleetctl and kubectl; the
    older ``key:value`` is accepted too) at its first ``=`` or ``:``, which a label key never holds;
    None when it has neither."""
    cut = _LABEL_SEPARATOR.search(raw)
    if cut is None:
        return None
    return raw[:cut.start()], raw[cut.end():]


def parse_label_filters(values: list[str]) -> dict[str, str]:
    """Turn ``["k=v", ...]`` query values (``k:v`` accepted too) into a label mapping.

    Raises:
        HTTPException: 400 for a value without ``=`` or ``:``, an empty or over-long key or value,
            or the same key twice.
    """
    labels: dict[str, str] = {}
    for raw in values:
        key, value = _split_label_term(raw) or ("", "")
        if not key or not value or len(key) > _MAX_LABEL_PART or len(value) > _MAX_LABEL_PART:
            raise HTTPException(400, f"label filter must be key=value (key:value is accepted too), "
                                     f"got {raw[:60]!r}")
        if key in labels:
            raise HTTPException(400, f"label {key[:60]!r} is given twice")
        labels[key] = value
    return labels


def checked_device_id(device_id: str) -> str:
    """Return ``device_id`` when it is a well-formed device id; 400 otherwise."""
    if not DEVICE_ID_RE.match(device_id):
        raise HTTPException(400, "malformed device id")
    return device_id


def fleet_router(store: FleetReader, tokens: Tokens) -> APIRouter:
    """Build the router of the read endpoints; every one needs the read token when configured."""
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(read_access(tokens))])
    summary = CachedRead(store.summary)

    @router.get("/devices", response_class=Response, responses={200: {"content": {"application/json": {}}}})
    def list_devices(
        *,
        label: Annotated[list[str], Query(description="label filter key=value, repeatable")] = [],  # noqa: B006
        sync_state: Annotated[str | None, Query(max_length=32)] = None,
        online: Annotated[bool | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        id_prefix: Annotated[str | None, Query(max_length=200, description="ids starting with this")] = None,
        sort: Annotated[str, Query(max_length=32, description=f"one of {', '.join(DEVICE_SORTS)}")] = "id",
        order: Annotated[str, Query(max_length=8, description="asc or desc")] = "asc",
    ) -> Response:
        """List devices matching every filter given (ids starting with ``id_prefix``), ordered by
        ``sort`` (then id) ``asc`` or ``desc``, one page at a time, with how many match in all
        (``{"devices": [...], "total": N, "limit": L, "offset": O}``)."""
        labels = parse_label_filters(label)
        if sync_state is not None and not _SYNC_STATE_RE.match(sync_state):
            raise HTTPException(400, "sync_state must be a lowercase word such as in_sync")
        if id_prefix is not None and not ID_PREFIX_RE.match(id_prefix):
            raise HTTPException(400, "id_prefix must be 1-128 letters, digits, '.', '_' or '-'")
        if sort not in DEVICE_SORTS:
            raise HTTPException(400, f"sort must be one of {', '.join(DEVICE_SORTS)}")
        if order not in ("asc", "desc"):
            raise HTTPException(400, "order must be asc or desc")
        # the store builds the whole answer as JSON text in one SQL statement (see store/sqlite/pages.py)
        body = store.devices_page_json(label=labels or None, sync_state=sync_state, online=online,
                                       limit=limit, offset=offset, id_prefix=id_prefix, sort=sort,
                                       descending=order == "desc")
        return Response(content=body, media_type="application/json")

    @router.get("/devices/{device_id}")
    def get_device(device_id: str) -> dict[str, Any]:
        """Return one device with its newest events and health samples."""
        device = store.device(checked_device_id(device_id))
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
        """Return the newest signed releases the Git watcher recorded, and the newest head commits it
        refused (``refused``: ``at``, ``commit``, ``code``, ``release``, ``reason``)."""
        return {"releases": store.releases(limit=limit),
                "refused": refused_heads(store.audit(limit=limit, action=REFUSED_ACTION))}

    @router.get("/audit")
    def get_audit(limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                  before: Annotated[int | None, Query(ge=1, le=2**62)] = None) -> dict[str, Any]:
        """Return the newest audit log entries; with ``before``, the entries older than that id (the
        next page: pass the smallest id of the page just read)."""
        return {"audit": store.audit(limit=limit, before=before)}

    return router
