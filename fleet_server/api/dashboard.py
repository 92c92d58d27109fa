"""The web dashboard: HTML pages at ``/``, ``/devices/{id}``, ``/rollouts``, ``/rollouts/{id}``,
``/releases`` and ``/audit``.

Each page is a Jinja2 template holding the layout and what is known without reading the fleet
(the device or rollout id, the refresh period, whether reads need a token). Its data comes from the
JSON API: ``static/dashboard.js`` fetches it every few seconds (with the bearer token the viewer
pasted into the page, kept in ``sessionStorage``) and draws tables and SVG charts
(``static/charts.js``); ``static/console.js`` adds the operator console (releases, audit log,
rollback and starting a rollout). So a page never shows more than its viewer may read, and state changes go
through the same authenticated API calls as ``fleetctl``. A rollout page reads the rollout's
summary and one page of its devices (``/api/v1/rollouts/{id}/devices``, filtered by wave and
state), never the whole device map. No CDN, no build step: everything the
browser loads is served from ``static/``.

The router also adds ``GET /api/v1/devices/{id}/health?hours=H`` (health samples of the last hours,
oldest first, for the device page's charts), which needs the read token like every other read.

Pages answer with a strict ``Content-Security-Policy`` (scripts, styles and requests only to this
server, no inline script) and ``X-Frame-Options: DENY``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from edge_core.messages import DEVICE_ID_RE
from fleet_server.api.auth import Tokens, read_access
from fleet_server.api.routes_fleet import FleetReader
from fleet_server.rollouts.engine import DEVICE_STATES

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_REFRESH_SECONDS",
    "MAX_HEALTH_HOURS",
    "MAX_HEALTH_SAMPLES",
    "ROLLOUT_ID_RE",
    "STATIC_DIR",
    "TEMPLATE_DIR",
    "dashboard_router",
    "install_dashboard",
]

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
MAX_HEALTH_HOURS = 72
MAX_HEALTH_SAMPLES = 5000
DEFAULT_REFRESH_SECONDS = 5.0

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
"""Sent with every page: nothing is loaded from anywhere but this server, and no inline script runs."""

ROLLOUT_ID_RE = DEVICE_ID_RE
"""Rollout ids shown in page URLs follow the same rules as device ids (letters, digits, ``.-_``)."""

_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def install_dashboard(app: FastAPI, store: FleetReader, tokens: Tokens, *,
                      refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> APIRouter:
    """Add the dashboard pages, the health-history endpoint and ``/static`` (CSS, JavaScript, icon)
    to ``app``; see :func:`dashboard_router` for the arguments. Return the router of the pages."""
    router = dashboard_router(store, tokens, refresh_seconds=refresh_seconds)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return router


def dashboard_router(store: FleetReader, tokens: Tokens, *,
                     refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> APIRouter:
    """Build the router of the dashboard pages and of the health-history endpoint they use.

    Args:
        store: the fleet database (only the health history is read here; pages read the JSON API).
        tokens: the API tokens; pages only need to know whether reads require one.
        refresh_seconds: how often pages fetch fresh data (a page's ``?refresh=N`` overrides it).
    """
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    templates = Jinja2Templates(env=env)
    read_needs_token = tokens.read is not None
    admin_configured = tokens.admin is not None
    router = APIRouter()

    def page(request: Request, template: str, title: str, **context: Any) -> HTMLResponse:
        response: HTMLResponse = templates.TemplateResponse(request, template, {
            "title": title, "refresh": refresh_seconds, "read_needs_token": read_needs_token,
            "admin_configured": admin_configured, **context})
        response.headers.update(_PAGE_HEADERS)
        return response

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> HTMLResponse:
        """The fleet overview: devices by sync state and online, and the filtered device table."""
        return page(request, "overview.html", "Fleet", nav="fleet")

    @router.get("/devices/{device_id}", response_class=HTMLResponse, include_in_schema=False)
    def device_page(request: Request, device_id: str) -> HTMLResponse:
        """One device: release, drift, last events and health charts."""
        if not DEVICE_ID_RE.match(device_id):
            raise HTTPException(400, "malformed device id")
        return page(request, "device.html", f"Device {device_id}", nav="fleet", device_id=device_id)

    @router.get("/rollouts", response_class=HTMLResponse, include_in_schema=False)
    def rollouts_page(request: Request) -> HTMLResponse:
        """Every rollout, newest first, with its phase and progress."""
        return page(request, "rollouts.html", "Rollouts", nav="rollouts")

    @router.get("/rollouts/{rollout_id}", response_class=HTMLResponse, include_in_schema=False)
    def rollout_page(request: Request, rollout_id: str) -> HTMLResponse:
        """One rollout: a chart per wave, the gate decisions and the operator buttons."""
        if not ROLLOUT_ID_RE.match(rollout_id):
            raise HTTPException(400, "malformed rollout id")
        return page(request, "rollout.html", f"Rollout {rollout_id}", nav="rollouts", rollout_id=rollout_id,
                    device_states=DEVICE_STATES)

    @router.get("/releases", response_class=HTMLResponse, include_in_schema=False)
    def releases_page(request: Request) -> HTMLResponse:
        """The signed releases the Git watcher recorded, with the rollouts of each, and the start
        of a rollout."""
        return page(request, "releases.html", "Releases", nav="releases")

    @router.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request) -> HTMLResponse:
        """The audit log, newest first, a page at a time."""
        return page(request, "audit.html", "Audit log", nav="audit")

    @router.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        """The icon browsers ask for on their own (the pages link ``/static/favicon.svg``)."""
        return Response((STATIC_DIR / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    @router.get("/api/v1/devices/{device_id}/health", dependencies=[Depends(read_access(tokens))])
    def device_health_history(
        device_id: str,
        hours: Annotated[float, Query(gt=0, le=MAX_HEALTH_HOURS)] = 6.0,
        limit: Annotated[int, Query(ge=1, le=MAX_HEALTH_SAMPLES)] = 2000,
    ) -> dict[str, Any]:
        """Return the device's health samples of the last ``hours``, oldest first (at most ``limit``,
        the newest kept)."""
        if not DEVICE_ID_RE.match(device_id):
            raise HTTPException(400, "malformed device id")
        if store.device(device_id) is None:
            raise HTTPException(404, f"no device {device_id}")
        since = time.time() - hours * 3600.0
        samples = store.device_health(device_id, since=since, limit=limit)
        samples.reverse()
        return {"device": device_id, "since": since, "health": samples}

    return router
