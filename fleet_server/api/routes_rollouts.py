"""Rollout routes under ``/api/v1/rollouts``: list, one rollout, start, and the operator actions.

    GET  /api/v1/rollouts                newest first (read token when configured)
    GET  /api/v1/rollouts/{id}           summary: state, waves with counts, gates, audit, samples
    GET  /api/v1/rollouts/{id}/devices   the rollout's devices, one page (wave=, state=, offset=, limit=)
    POST /api/v1/rollouts                {release, plan (inline mapping) | plan_name, reason} -> 201
    POST /api/v1/rollouts/{id}/{action}  pause | resume | promote | abort | rollback; {reason, wave?}

Every route is a plain ``def``: FastAPI runs it in its thread pool, so a runner tick holding the
runner's lock never blocks the event loop. POSTs need the admin token. The actor recorded in the
audit log is the ``X-Actor`` header (a short name), else ``admin``. A refused action answers 409
with the engine's reason; an unknown rollout 404; a bad plan 400 with the place in the plan
(``waves.1.percent: ...``).

``GET /api/v1/rollouts/{id}`` carries no per-device map (at 100,000 devices it took most of a second
and the dashboard polls it): ``device_count`` says how many devices the rollout covers, and the
devices themselves are read a page at a time (default :data:`DEFAULT_DEVICE_PAGE`, at most
:data:`MAX_DEVICE_PAGE`) with the total of the filtered listing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Header, HTTPException, Query

from edge_core.errors import BundleError
from fleet_server.api.auth import Tokens, admin_access, read_access
from fleet_server.api.bodies import ActionBody, StartRolloutBody
from fleet_server.errors import PlanError, UsageError
from fleet_server.rollouts.engine import DEVICE_STATES
from fleet_server.rollouts.plan import RolloutPlan
from fleet_server.rollouts.preflight import AUDIT_ACTION as PREFLIGHT_AUDIT
from fleet_server.rollouts.runner import ACTIONS

__all__ = ["DEFAULT_DEVICE_PAGE", "MAX_DEVICE_PAGE", "RolloutControl", "actor_name", "rollouts_router"]

DEFAULT_DEVICE_PAGE = 100
"""Devices per page of ``GET /api/v1/rollouts/{id}/devices`` when ``limit`` is not given."""
MAX_DEVICE_PAGE = 1000
"""The largest ``limit`` that listing takes."""

_ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RolloutControl(Protocol):
    """What the routes ask of the rollout runner (``RolloutRunner`` provides it)."""

    def resolve_plan(self, plan: Mapping[str, Any] | None, plan_name: str | None) -> RolloutPlan:
        """Return the plan of a start request."""
        ...

    def start_refusal(self, release: int) -> str | None:
        """Return why a rollout of ``release`` cannot start now, or None."""
        ...

    def start(self, release: int, plan: RolloutPlan, *, actor: str, reason: str,
              rollout_id: str | None = None, preflight: bool = False) -> str:
        """Start a rollout (with a preflight first when asked); return its id."""
        ...

    def exists(self, rollout_id: str) -> bool:
        """Tell whether the rollout was ever started."""
        ...

    def act(self, rollout_id: str, action: str, *, actor: str, reason: str,
            wave: int | None = None) -> str | None:
        """Apply an operator action; return why it was refused, or None."""
        ...

    def describe(self, rollout_id: str) -> dict[str, Any] | None:
        """Return one rollout's summary (no per-device map), or None."""
        ...

    def devices(self, rollout_id: str, *, wave: int | None = None, state: str | None = None,
                offset: int = 0, limit: int = 100) -> dict[str, Any] | None:
        """Return one page of a rollout's devices (``devices``, ``total``), or None when unknown."""
        ...

    def summaries(self, limit: int) -> list[dict[str, Any]]:
        """Return rollouts newest first, without their device maps."""
        ...


def actor_name(header: str | None) -> str:
    """Return the actor an ``X-Actor`` header names (``admin`` when absent).

    Raises:
        HTTPException: 400 when the name is not 1-64 letters, digits or ``._@-``.
    """
    if header is None or not header.strip():
        return "admin"
    name = header.strip()
    if not _ACTOR_RE.match(name):
        raise HTTPException(400, "X-Actor must be 1-64 letters, digits, '.', '_', '@' or '-'")
    return name


def _rollout_id(rollout_id: str) -> str:
    if not _ID_RE.match(rollout_id):
        raise HTTPException(400, "malformed rollout id")
    return rollout_id


def rollouts_router(control: RolloutControl, tokens: Tokens) -> APIRouter:
    """Build the router of ``/api/v1/rollouts``."""
    router = APIRouter(prefix="/api/v1/rollouts")
    reads = [Depends(read_access(tokens))]
    admin = [Depends(admin_access(tokens))]

    @router.get("", dependencies=reads)
    def list_rollouts(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        """List rollouts newest first."""
        return {"rollouts": control.summaries(limit)}

    @router.get("/{rollout_id}", dependencies=reads)
    def get_rollout(rollout_id: str) -> dict[str, Any]:
        """Return one rollout: state, waves with counts, gates, audit, progress samples (no devices)."""
        detail = control.describe(_rollout_id(rollout_id))
        if detail is None:
            raise HTTPException(404, f"no rollout {rollout_id}")
        return detail

    @router.get("/{rollout_id}/devices", dependencies=reads)
    def rollout_devices(rollout_id: str, *,
                        wave: Annotated[int | None, Query(ge=0, le=1000)] = None,
                        state: Annotated[str | None, Query(max_length=32)] = None,
                        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
                        limit: Annotated[int, Query(ge=1, le=MAX_DEVICE_PAGE)] = DEFAULT_DEVICE_PAGE,
                        ) -> dict[str, Any]:
        """Return one page of a rollout's devices ordered by id, filtered by wave (0-based) and state,
        with the total of the filtered listing."""
        rid = _rollout_id(rollout_id)
        if state is not None and state not in DEVICE_STATES:
            raise HTTPException(400, f"state must be one of {', '.join(DEVICE_STATES)}")
        page = control.devices(rid, wave=wave, state=state, offset=offset, limit=limit)
        if page is None:
            raise HTTPException(404, f"no rollout {rid}")
        return {"id": rid, "wave": wave, "state": state, "offset": offset, "limit": limit,
                "total": page["total"], "devices": page["devices"]}

    @router.get("/{rollout_id}/preflight", dependencies=reads)
    def rollout_preflight(rollout_id: str) -> dict[str, Any]:
        """Return the rollout's preflight: its latest summary (state, counts, refusals by reason,
        devices offline or not answered yet); 404 for a rollout without one."""
        rid = _rollout_id(rollout_id)
        detail = control.describe(rid)
        if detail is None:
            raise HTTPException(404, f"no rollout {rid}")
        rows = [a for a in detail.get("audit") or [] if a.get("action") == PREFLIGHT_AUDIT]
        if rows:
            return {"id": rid, **rows[-1]["detail"]}
        if detail.get("preflight") is None:
            raise HTTPException(404, f"rollout {rid} has no preflight")
        return {"id": rid, "state": "starting", "counts": {}, "refusals": [], "offline": [], "waiting": []}

    @router.post("", status_code=201, dependencies=admin)
    def start_rollout(body: StartRolloutBody,
                      x_actor: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Start a rollout of a recorded signed release (admin token)."""
        actor = actor_name(x_actor)
        release, plan_doc, plan_name, reason = body.release, body.plan, body.plan_name, body.reason
        try:
            plan = control.resolve_plan(plan_doc, plan_name)
        except (PlanError, BundleError) as exc:
            where = ".".join(str(p) for p in exc.where)
            raise HTTPException(400, f"invalid plan: {where + ': ' if where else ''}{exc.reason}") from exc
        except UsageError as exc:
            raise HTTPException(400, str(exc)) from exc
        refusal = control.start_refusal(release)
        if refusal is not None:
            raise HTTPException(409, refusal)
        try:
            rollout_id = control.start(release, plan, actor=actor, reason=reason, preflight=body.preflight)
        except UsageError as exc:
            raise HTTPException(409 if control.start_refusal(release) else 400, str(exc)) from exc
        return {"id": rollout_id, "release": release, "plan": plan.name}

    @router.post("/{rollout_id}/{action}", dependencies=admin)
    def rollout_action(rollout_id: str, action: str, body: ActionBody | None = None,
                       x_actor: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Pause, resume, promote, abort or roll back a rollout (admin token); 409 when refused."""
        actor = actor_name(x_actor)
        if action not in ACTIONS:
            raise HTTPException(404, f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        rid = _rollout_id(rollout_id)
        data = body or ActionBody()
        reason, wave = data.reason, data.wave
        if not control.exists(rid):
            raise HTTPException(404, f"no rollout {rid}")
        refusal = control.act(rid, action, actor=actor, reason=reason, wave=wave)
        if refusal is not None:
            raise HTTPException(409, refusal)
        detail = control.describe(rid)
        return {"id": rid, "action": action, "phase": detail["phase"] if detail else None}

    return router
